"""`llm-predictor soak`: start a local server (or use --url), run the clients, check the server settled, report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path

import httpx

from predictor.tools.bench import machine, server
from predictor.tools.soak.abusive import run_abusive_peers
from predictor.tools.soak.clients import run_clients
from predictor.tools.soak.gauges import read_state, settle
from predictor.tools.soak.prober import Prober
from predictor.tools.soak.report import SoakRun, summary_lines, write

logger = logging.getLogger("predictor.tools.soak")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llm-predictor soak",
        description="N clients for T seconds sending every route (streamed and not), abandoning some requests "
        "midway and sending bad input, alongside abusive peers (slow and huge headers, abandoned embeddings, big "
        "grammars) while readiness probes are timed; reports outcomes per request kind, probe latency, server RSS, "
        "and whether the running, waiting and KV gauges return to 0. Exits 1 on any server error or a server that "
        "did not settle.",
    )
    parser.add_argument("--url", help="a running endpoint to soak instead of launching a local server")
    parser.add_argument("--model", help="the served model name (default: demo, or 'model' with --model_dir)")
    parser.add_argument("--model_dir", type=Path, help="the local server's model (default: the demo model)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--disconnect_rate", type=float, default=0.1,
                        help="share of well-formed requests whose client hangs up midway (default 0.1)")
    parser.add_argument("--abusive_peers", type=int,
                        help="peers sending slow headers, huge headers, abandoned embeddings and big grammars "
                        "alongside the clients (default: one per 8 clients, at least 1; 0 for none)")
    parser.add_argument("--seed", type=int, default=0, help="chooses each client's requests")
    parser.add_argument("--api_key", help="bearer token for a server started with --api_key")
    parser.add_argument("--results_dir", type=Path, default=Path("soak-results"),
                        help="each run writes a timestamped directory under it")
    parser.add_argument("--max_model_len", type=int, default=512, help="local server's --max_model_len")
    parser.add_argument("--server_args", default="", help="more flags for the local server, one shell-quoted string")
    args = parser.parse_args(argv)
    if args.url and not args.model:
        parser.error("--url needs --model, the name the endpoint serves")
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.disconnect_rate <= 1:
        parser.error("--clients must be positive, --duration positive, --disconnect_rate within [0, 1]")
    if args.abusive_peers is None:
        args.abusive_peers = max(1, args.clients // 8)
    elif args.abusive_peers < 0:
        parser.error("--abusive_peers must be 0 or more")
    args.model = args.model or ("model" if args.model_dir else "demo")
    return args


def server_flags(args) -> list[str]:
    return [f"--max_model_len={args.max_model_len}", *shlex.split(args.server_args)]


def still_serves(url: str, model: str, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "Hello", "max_tokens": 2}
    completion = httpx.post(f"{url}/openai/v1/completions", json=body, headers=headers, timeout=60)
    return completion.status_code == 200 and httpx.get(f"{url}/v1/models/{model}", timeout=10).status_code == 200


def soak(args, run_dir: Path) -> SoakRun:
    load_at_start = machine.load_average()
    local = None if args.url else server.start(run_dir / "server.log", args.model_dir, args.model, server_flags(args))
    url = args.url or local.url
    try:
        before = read_state(url)
        logger.info("%d clients and %d abusive peers for %g s against %s", args.clients, args.abusive_peers,
                    args.duration, url)
        prober = Prober.start(url, args.duration)
        tally, abuse = asyncio.run(_load(url, args))
        probes = prober.latencies()
        after, settle_s = settle(url)
        serves = still_serves(url, args.model, args.api_key)
        peak = local.peak_rss_bytes() if local else None
    finally:
        if local:
            local.stop()
    return SoakRun(
        machine=machine.describe(load_at_start),
        server=args.url or f"local, python -m predictor {' '.join(server_flags(args))} ({args.model_dir or 'demo'})",
        load=f"{args.clients} clients and {args.abusive_peers} abusive peers for {args.duration:g} s, "
             f"{args.disconnect_rate:.0%} of well-formed requests abandoned midway, seed {args.seed}",
        tally=tally, abuse=abuse, probes=probes, before=before, after=after, settle_s=settle_s,
        peak_rss_bytes=peak, still_serves=serves,
    )


async def _load(url: str, args):
    return await asyncio.gather(
        run_clients(url, args.model, args.api_key, args.clients, args.duration, args.disconnect_rate, args.seed),
        run_abusive_peers(url, args.model, args.api_key, args.abusive_peers, args.duration, args.seed))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the progress lines
    run_dir = args.results_dir / time.strftime("%Y%m%d-%H%M%S")
    run = soak(args, run_dir)
    results = write(run, run_dir)
    print(results.read_text())
    print(f"results: {results.parent} (results.md, results.json)")
    print("\n".join(summary_lines(run)[-1:]))
    sys.stdout.flush()
    return 0 if run.passed else 1

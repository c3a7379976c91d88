"""`llm-predictor bench`: one run measuring the raw decode loop, the server and the one-at-a-time baseline."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from predictor.tools.bench import client, machine, prefix, report, server
from predictor.tools.bench.baseline import BaselineResult, run_one_at_a_time
from predictor.tools.bench.raw_loop import load_model, median_prefill_seconds, run_compiled_loop, run_raw_loop
from predictor.tools.bench.results import RATIO_STREAMS, BenchRun, SweepPoint
from predictor.tools.bench.shapes import SHAPES, make_shape_model
from predictor.tools.bench.workload import BenchRequest, build_workload, parse_range

logger = logging.getLogger("predictor.tools.bench")

QUICK = dict(concurrency="1,2", prompt_tokens="16-48", max_tokens="8-16", baseline_requests=2, min_wave_requests=2)
FULL = dict(concurrency="1,4,16,32,64", prompt_tokens="32-256", max_tokens="64-128", baseline_requests=3,
            min_wave_requests=4)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llm-predictor bench",
        description="Generated tok/s, TTFT and ITL of the server with N streaming clients, against the raw batched "
        "decode loop (the compute limit) and one request at a time, on the same prompts.",
    )
    parser.add_argument("--url", help="a running endpoint to measure instead of launching a local server")
    parser.add_argument("--model", help="the served model name (default: demo, or 'model' with --model_dir)")
    parser.add_argument("--model_dir", type=Path,
                        help="local copy of the model for the in-process measurements (default: the demo model "
                             "when launching locally; none with --url skips them)")
    parser.add_argument("--concurrency", help=f"streams per wave, comma-separated (default {FULL['concurrency']})")
    parser.add_argument("--prompt_tokens", help=f"prompt length range in tokens (default {FULL['prompt_tokens']})")
    parser.add_argument("--max_tokens", help=f"new tokens per request, a range or one number "
                                             f"(default {FULL['max_tokens']})")
    parser.add_argument("--baseline_requests", type=int, help="requests for the one-at-a-time baseline (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="chooses prompt lengths, text and max_tokens")
    parser.add_argument("--results_dir", type=Path, default=Path("bench-results"),
                        help="each run writes a timestamped directory under it")
    parser.add_argument("--max_num_seqs", type=int, default=64, help="local server's --max_num_seqs")
    parser.add_argument("--max_model_len", type=int, default=512, help="local server's --max_model_len")
    parser.add_argument("--server_args", default="", help="more flags for the local server, one shell-quoted string")
    parser.add_argument("--api_key", help="bearer token for a server started with --api_key")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the in-process loops and the local server run")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="measure a random-weight Llama of this real shape, made in the run, instead of the "
                             "demo model")
    parser.add_argument("--models_dir", type=Path, default=Path(".cache") / "bench-models",
                        help="where --shape models are saved (once; 13.5 GB for llama-2-7b in bfloat16)")
    parser.add_argument("--sampled", action="store_true",
                        help="run the largest wave again sampling (temperature 0.8, top_p 0.9, a seed per request)")
    parser.add_argument("--shared_prefix_tokens", type=int,
                        help="instead of the sweep: TTFT of a prompt of this many tokens, then of the same prompt "
                             "plus a short suffix, with prefix caching on and off (what the prefix cache saves)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK['concurrency']} streams, prompts {QUICK['prompt_tokens']}, "
                             f"max_tokens {QUICK['max_tokens']}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
        args.prompt_tokens, args.max_tokens = parse_range(args.prompt_tokens), parse_range(args.max_tokens)
    except ValueError as err:
        parser.error(str(err))
    if args.shared_prefix_tokens is not None:
        if args.shared_prefix_tokens < 2:
            parser.error("--shared_prefix_tokens must be at least 2")
        args.max_model_len = max(args.max_model_len, args.shared_prefix_tokens + 64)  # the suffix and new tokens
    if args.url and not args.model:
        parser.error("--url needs --model, the name the endpoint serves")
    if min(args.concurrency) < 1:
        parser.error("--concurrency must be positive")
    if not args.url and args.prompt_tokens[1] + args.max_tokens[1] > args.max_model_len:
        parser.error("the longest prompt plus max_tokens must fit --max_model_len")
    if args.shape and args.model_dir:
        parser.error("give --shape or --model_dir, not both")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.model = args.model or ("model" if args.model_dir or args.shape else "demo")
    return args


@dataclass
class InProcess:
    """What the in-process measurements produce for the report."""

    raw_by_streams: dict
    compiled_by_streams: dict
    baseline: BaselineResult | None
    single_prefill_s: float | None
    roofline_tokens_per_s: float | None
    copy_bandwidth_bytes_per_s: float | None
    notes: list[str]


def wave_requests(workload: list[BenchRequest], concurrency: int, min_requests: int) -> list[BenchRequest]:
    """The first `concurrency` requests; a small wave gets a few more, sent one after another per client."""
    return workload[:max(concurrency, min_requests)]


def measure_in_process(args, model_dir: Path, workload: list[BenchRequest], pad_id: int) -> InProcess:
    model = load_model(model_dir, args.device, args.dtype)
    run_raw_loop(model, [BenchRequest(r.prompt, r.prompt_ids, 4) for r in workload[:2]], pad_id)  # warm-up
    single_prefill_s = median_prefill_seconds(model, wave_requests(workload, 1, args.min_wave_requests))
    raw_by_streams, compiled_by_streams, notes = {}, {}, []
    for streams in args.concurrency:
        raw = raw_by_streams[streams] = run_raw_loop(model, workload[:streams], pad_id)
        logger.info("raw loop, %d streams: %.1f tok/s (prefill %.0f ms)", streams, raw.tokens_per_s,
                    raw.prefill_s * 1000)
        if args.device == "cuda":
            try:
                compiled = compiled_by_streams[streams] = run_compiled_loop(model, workload[:streams], pad_id)
                logger.info("compiled loop, %d streams: %.1f tok/s", streams, compiled.tokens_per_s)
            except Exception as err:  # noqa: BLE001 - the reference loop failing must not lose the other figures
                notes.append(f"compiled loop, {streams} streams, failed: {type(err).__name__}: {err}"[:300])
    baseline = run_one_at_a_time(model, workload[:args.baseline_requests], pad_id)
    logger.info("one at a time: %.1f tok/s", baseline.tokens_per_s)
    notes.append(_parity_note(raw_by_streams[max(args.concurrency)], baseline))
    bandwidth = machine.copy_bandwidth_bytes_per_s(args.device)
    roofline = bandwidth / _bytes_per_step(model, workload[0])
    del model
    gc.collect()
    return InProcess(raw_by_streams, compiled_by_streams, baseline, single_prefill_s, roofline, bandwidth, notes)


def _bytes_per_step(model, request: BenchRequest) -> int:
    """What one decode step of one stream must read: every weight, and the KV cache at the mid-generation length."""
    from predictor import model_facts

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config.to_dict()
    element = next(model.parameters()).element_size()
    context = len(request.prompt_ids) + request.max_tokens // 2
    return weights + model_facts.config_kv_bytes_per_token(config, element) * context


def _parity_note(raw, baseline: BaselineResult) -> str:
    """The raw loop is only a fair limit if it computes the same greedy tokens as generate."""
    pairs = list(zip(raw.token_ids, baseline.token_ids))
    same = sum(a == b for a, b in pairs)
    return f"raw loop greedy tokens equal model.generate's for {same} of {len(pairs)} requests"


def measure_server(args, target: client.Target, workload: list[BenchRequest], local,
                   notes: list[str]) -> list[SweepPoint]:
    asyncio.run(client.probe(target, workload[0]))
    if not target.include_usage:
        notes.append("the server refuses stream_options: token counts come from finish_reason and max_tokens")
    points = []
    for streams in args.concurrency:
        requests = wave_requests(workload, streams, args.min_wave_requests)
        wave = asyncio.run(client.run_wave(target, requests, streams))
        rss = local.peak_rss_bytes() if local else None
        points.append(SweepPoint(streams, wave=wave, server_peak_rss_bytes=rss))
        logger.info("server, %d streams: %.1f tok/s", streams, wave.tokens_per_s)
        expected = sum(r.max_tokens for r in requests)
        if wave.generated_tokens != expected:
            notes.append(f"{streams} streams: the server generated {wave.generated_tokens} tokens, not the "
                         f"{expected} asked for (ignore_eos not honoured?)")
    return points


def measure_sampled(args, target: client.Target, workload: list[BenchRequest]) -> client.WaveResult:
    streams = max(args.concurrency)
    requests = wave_requests(workload, streams, args.min_wave_requests)
    sampling = dataclasses.replace(target, sampling={"temperature": 0.8, "top_p": 0.9})
    wave = asyncio.run(client.run_wave(sampling, requests, streams, seeded=True))
    logger.info("server, %d streams sampling: %.1f tok/s", streams, wave.tokens_per_s)
    return wave


# The sweep sends the same prompts at every concurrency: a prefix cache would serve the later waves' prompts from
# the earlier ones' blocks, while the raw loop prefills each time. --server_args may turn it back on.
SWEEP_FLAGS = ("--no-enable_prefix_caching",)


def server_flags(args, *fixed: str) -> list[str]:
    return [f"--max_num_seqs={args.max_num_seqs}", f"--max_model_len={args.max_model_len}",
            f"--device={args.device}", f"--dtype={args.dtype}", *fixed, *shlex.split(args.server_args)]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for chatty in ("httpx", "matplotlib"):  # a line per request or font scan would bury the progress lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    run_dir = args.results_dir / time.strftime("%Y%m%d-%H%M%S")
    if args.shared_prefix_tokens is not None:
        return measure_shared_prefix(args, run_dir)
    try:
        run = measure(args, run_dir)
    except client.ServerRefused as err:
        print(f"llm-predictor bench: the server refused a request: {err}", file=sys.stderr)
        return 1
    results = report.write(run, run_dir)
    print(results.read_text())
    print(f"results: {results.parent} (results.md, results.png, results.json)")
    if run.headline_point and run.headline_point.concurrency != RATIO_STREAMS:
        print(f"(no {RATIO_STREAMS}-stream wave: the ratio below is for {run.headline_point.concurrency} streams)")
    print(report.ratio_line(run))
    sys.stdout.flush()
    return 0


def measure_shared_prefix(args, run_dir: Path) -> int:
    from predictor.tools.demo import ensure_demo_model

    if args.shape:
        args.model_dir = make_shape_model(args.shape, args.models_dir, args.device, args.dtype)
    tokenizer = load_tokenizer(args.model_dir or ensure_demo_model())
    try:
        results = prefix.run(args, tokenizer, args.model_dir, server_flags(args), run_dir)
    except client.ServerRefused as err:
        print(f"llm-predictor bench: the server refused a request: {err}", file=sys.stderr)
        return 1
    text = prefix.table(results, args.shared_prefix_tokens)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "shared-prefix.md").write_text(text)
    print(text)
    print(f"results: {run_dir / 'shared-prefix.md'}")
    return 0


def measure(args, run_dir: Path) -> BenchRun:
    """In-process first (the server is not running yet, so both get the machine to themselves), then the server."""
    from predictor.tools.demo import ensure_demo_model

    load_at_start = machine.load_average()
    if args.shape:
        args.model_dir = make_shape_model(args.shape, args.models_dir, args.device, args.dtype)
    local_model_dir = args.model_dir or (None if args.url else ensure_demo_model())
    notes = []
    if local_model_dir is None:
        notes.append("no --model_dir: the raw loop and the one-at-a-time baseline were skipped; prompts use the "
                     "demo model's Llama-2 tokenizer")
    tokenizer = load_tokenizer(local_model_dir or ensure_demo_model())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    count = max(max(args.concurrency), args.min_wave_requests, args.baseline_requests)
    workload = build_workload(tokenizer, count, args.prompt_tokens, args.max_tokens, args.seed)

    in_process = measure_in_process(args, local_model_dir, workload, pad_id) if local_model_dir else None
    flags = server_flags(args, *SWEEP_FLAGS)
    local = None if args.url else server.start(run_dir / "server.log", args.model_dir, args.model, flags)
    try:
        target = client.Target(args.url or local.url, args.model, args.api_key)
        points = measure_server(args, target, workload, local, notes)
        sampled = measure_sampled(args, target, workload) if args.sampled else None
    finally:
        if local:
            local.stop()
    for point in points:
        point.raw = in_process.raw_by_streams.get(point.concurrency) if in_process else None
        point.compiled = in_process.compiled_by_streams.get(point.concurrency) if in_process else None

    return BenchRun(
        machine=machine.describe(load_at_start),
        model=args.model + (f" ({local_model_dir}; in process: {args.dtype}, {args.device})" if local_model_dir
                            else ""),
        workload={
            "prompts": f"{count} prompts of {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens cut from one fixed "
                       f"paragraph (seed {args.seed}); N streams send the first max(N, {args.min_wave_requests})",
            "generation": f"{args.max_tokens[0]}-{args.max_tokens[1]} new tokens per request, greedy, ignore_eos",
        },
        server=args.url or f"local, python -m predictor {' '.join(flags)}",
        points=points,
        baseline=in_process.baseline if in_process else None,
        single_prefill_s=in_process.single_prefill_s if in_process else None,
        roofline_tokens_per_s=in_process.roofline_tokens_per_s if in_process else None,
        copy_bandwidth_bytes_per_s=in_process.copy_bandwidth_bytes_per_s if in_process else None,
        sampled=sampled,
        notes=notes + (in_process.notes if in_process else []),
    )

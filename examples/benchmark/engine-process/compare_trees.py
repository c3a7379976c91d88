"""Our server from two source trees (before and after a change), alternating, in one run: the host-bound model
(1 layer, hidden 64: host work dominates each step) at N streams; tok/s, TTFT and ITL p50, start-up time and
peak RSS (the server's process and its children summed).

    cd /tmp && PYTHONPATH=$REPO flock /work/bench.lock $REPO/.venv/bin/python \
        $REPO/examples/benchmark/engine-process/compare_trees.py --tree before=/tmp/base --tree after=$REPO \
        --models_dir $REPO/.cache/bench-models --out $REPO/bench-results/engine-process --repeats 3

Each tree runs as `python -m predictor` with PYTHONPATH=<tree>, so its `predictor` is the one imported: run it
from a directory holding no `predictor` package (`python -m` puts the working directory first on the path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from predictor.tools.bench import client, server
from predictor.tools.bench.peers import cpu, models
from predictor.tools.bench.peers.workload import distinct_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="append", required=True, help="label=path of a source tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128, help="per wave; each stream sends its share in turn")
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--models_dir", type=Path, default=Path(".cache/bench-models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine-process"))
    parser.add_argument("--quiet_cores", type=float, default=0.3,
                        help="before each server, wait (up to --quiet_wait_s) until the rest of the machine uses "
                             "at most this many cores")
    parser.add_argument("--quiet_wait_s", type=float, default=120)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # stop the server we started
    trees = [tuple(spec.split("=", 1)) for spec in args.tree]
    name, model_dir = models.resolve(models.HOST_BOUND, args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm_up = distinct_prompts(tokenizer, "Warm", args.streams, 32, 8)
    flags = [f"--max_num_seqs={args.streams}", "--max_model_len=2048", "--kv_cache_bytes=2GiB", "--device=cpu",
             "--dtype=float32"]
    runs = []
    for repeat in range(args.repeats):
        for label, tree in trees:
            requests = distinct_prompts(tokenizer, f"Run{repeat}{label}", args.requests, args.prompt_tokens,
                                        args.max_tokens)
            others_at_start = cpu.wait_for_quiet(args.quiet_cores, args.quiet_wait_s)
            began = time.perf_counter()
            local = server.start(args.out / f"{label}-{repeat}.log", model_dir, name, flags,
                                 {"PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "2"})
            startup_s = time.perf_counter() - began
            try:
                target = client.Target(local.url, name)
                asyncio.run(client.probe(target, warm_up[0]))
                asyncio.run(client.run_wave(target, warm_up, args.streams))
                meter = cpu.CpuMeter(local.process.pid)
                wave = asyncio.run(client.run_wave(target, requests, args.streams))
                use = meter.stop()
                rss = local.peak_rss_bytes()
            finally:
                local.stop()
            run = {"tree": label, "repeat": repeat, "tok_s": wave.tokens_per_s,
                   "ttft_p50_ms": 1000 * statistics.median(wave.ttfts_s),
                   "itl_p50_ms": 1000 * statistics.median(wave.itls_s), "startup_s": startup_s,
                   "peak_rss_mib": (rss or 0) / 2**20, "tokens": wave.generated_tokens,
                   "core_process": "predictor.core_process" in local.log.read_text(),  # which code ran
                   "server_cores": use.server_cores, "others_cores": use.others_cores,
                   "others_cores_at_start": others_at_start}
            print(json.dumps(run), flush=True)
            runs.append(run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    print("| tree | tok/s | ITL p50 ms | TTFT p50 ms | start-up s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for label, _ in trees:
        mine = [r for r in runs if r["tree"] == label]
        print(f"| {label} | " + " | ".join(
            f"{statistics.median(r[key] for r in mine):.1f}"
            for key in ("tok_s", "itl_p50_ms", "ttft_p50_ms", "startup_s", "peak_rss_mib")) + " |")


if __name__ == "__main__":
    main()

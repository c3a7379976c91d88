"""The results directory: a markdown table, a PNG plot and the raw numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from predictor.tools.bench.results import BenchRun, SweepPoint, percentile_ms

COLUMNS = [
    "streams", "raw loop tok/s", "server tok/s", "server / raw loop", "server / one-at-a-time",
    "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "raw batch prefill ms", "server peak RSS MiB",
]
COMPILED_COLUMNS = ["compiled loop tok/s", "server / compiled loop"]  # only where the CUDA-graph loop ran


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_row(point: SweepPoint, run: BenchRun) -> list[str]:
    raw, wave = point.raw, point.wave
    ttfts, itls = (wave.ttfts_s, wave.itls_s) if wave else ([], [])
    rss = point.server_peak_rss_bytes
    return [
        str(point.concurrency),
        fmt(raw.tokens_per_s if raw else None),
        fmt(wave.tokens_per_s if wave else None),
        fmt(point.server_over_raw, 2),
        fmt(point.server_over(run.baseline), 2),
        fmt(percentile_ms(ttfts, 50)),
        fmt(percentile_ms(ttfts, 99)),
        fmt(percentile_ms(itls, 50)),
        fmt(percentile_ms(itls, 99)),
        fmt(raw.prefill_s * 1000 if raw else None),
        fmt(rss / 2**20 if rss else None, 0),
        *([fmt(point.compiled.tokens_per_s if point.compiled else None), fmt(point.server_over_compiled, 2)]
          if run.has_compiled else []),
    ]


def markdown_table(run: BenchRun) -> str:
    columns = COLUMNS + (COMPILED_COLUMNS if run.has_compiled else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(table_row(p, run)) + " |" for p in run.points]
    return "\n".join(lines)


def limits(run: BenchRun) -> list[str]:
    lines = []
    if run.roofline_tokens_per_s:
        one = run.point(1)
        server = one.wave.tokens_per_s if one and one.wave else None
        share = f" (the server's 1 stream: {fmt(server / run.roofline_tokens_per_s * 100, 0)}%)" if server else ""
        lines.append(f"- memory roofline at 1 stream: {run.roofline_tokens_per_s:.1f} tok/s from a measured copy "
                     f"bandwidth of {run.copy_bandwidth_bytes_per_s / 1e9:.0f} GB/s over the weights and KV"
                     f"{share}")
    if run.sampled:
        largest = max(run.points, key=lambda p: p.concurrency)
        greedy = largest.wave.tokens_per_s if largest.wave else None
        share = f" = {run.sampled.tokens_per_s / greedy:.2f} of greedy" if greedy else ""
        lines.append(f"- {run.sampled.concurrency} streams sampling (temperature 0.8, top_p 0.9, a seed each): "
                     f"{run.sampled.tokens_per_s:.1f} tok/s{share}")
    return lines


def markdown(run: BenchRun) -> str:
    baseline = run.baseline
    one_stream = run.point(1)
    ttft_one = percentile_ms(one_stream.wave.ttfts_s, 50) if one_stream and one_stream.wave else None
    lines = [
        "# llm-predictor benchmark",
        "",
        *(f"- {key}: {value}" for key, value in run.machine.items()),
        f"- model: {run.model}",
        *(f"- {key}: {value}" for key, value in run.workload.items()),
        f"- server: {run.server}",
        "- one-at-a-time baseline (model.generate, greedy): "
        + (f"{baseline.tokens_per_s:.1f} tok/s over {baseline.requests} requests" if baseline else "not measured"),
        f"- raw prefill of one prompt: {fmt(run.single_prefill_s * 1000 if run.single_prefill_s else None)} ms; "
        f"TTFT target (1.25x + 10 ms): {fmt(run.ttft_target_ms)} ms; server TTFT p50 at 1 stream: {fmt(ttft_one)} ms",
        *limits(run),
        *(f"- note: {note}" for note in run.notes),
        "",
        markdown_table(run),
        "",
        "tok/s counts generated tokens: the raw loop's over its decode loop alone (prefill excluded), the server's "
        "over the whole wave (first request sent to last token received). The raw loop is the model's forward "
        "with a static cache, eager; the compiled loop the same under torch.compile(mode='reduce-overhead') (CUDA "
        "graphs). TTFT is to the first chunk with text; ITL the gaps between later chunks. Peak RSS is the "
        "server's VmHWM so far.",
        "",
    ]
    return "\n".join(lines)


def plot(run: BenchRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [p.concurrency for p in run.points]
    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    _line(throughput, streams, [p.wave.tokens_per_s if p.wave else None for p in run.points], "server", "o-")
    _line(throughput, streams, [p.raw.tokens_per_s if p.raw else None for p in run.points], "raw decode loop", "s--")
    _line(throughput, streams, [p.compiled.tokens_per_s if p.compiled else None for p in run.points],
          "compiled (CUDA-graph) loop", "d-.")
    if run.roofline_tokens_per_s:
        throughput.plot([1], [run.roofline_tokens_per_s], "k*", markersize=10, label="memory roofline, 1 stream")
    if run.baseline:
        throughput.axhline(run.baseline.tokens_per_s, color="gray", linestyle=":", label="one request at a time")
    throughput.set(title="generated tokens/s", xlabel="concurrent streams", ylabel="tok/s")

    _line(ttft, streams, [percentile_ms(p.wave.ttfts_s, 50) if p.wave else None for p in run.points],
          "server TTFT p50", "o-")
    _line(ttft, streams, [percentile_ms(p.wave.ttfts_s, 99) if p.wave else None for p in run.points],
          "server TTFT p99", "^:")
    _line(ttft, streams, [p.raw.prefill_s * 1000 if p.raw else None for p in run.points],
          "raw loop: batch prefill", "s--")
    ttft.set(title="time to first token", xlabel="concurrent streams", ylabel="ms")

    for axes in (throughput, ttft):
        axes.set_xscale("log", base=2)
        axes.set_xticks(streams, [str(s) for s in streams])
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    fig.suptitle(f"{run.model} - {run.machine.get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(axes, xs: list[int], ys: list[float | None], label: str, style: str) -> None:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pairs:
        axes.plot(*zip(*pairs), style, label=label)


def as_json(run: BenchRun) -> dict:
    points = []
    for point in run.points:
        raw, wave = point.raw, point.wave
        points.append({
            "streams": point.concurrency,
            "raw_loop": raw and {"tokens_per_s": raw.tokens_per_s, "decoded_tokens": raw.decoded_tokens,
                                 "tokens_per_s_with_prefill": raw.tokens_per_s_with_prefill,
                                 "decode_s": raw.decode_s, "prefill_s": raw.prefill_s},
            "compiled_loop": point.compiled and {"tokens_per_s": point.compiled.tokens_per_s,
                                                 "decode_s": point.compiled.decode_s},
            "server": wave and {"tokens_per_s": wave.tokens_per_s, "generated_tokens": wave.generated_tokens,
                                "wall_s": wave.wall_s, "ttft_s": wave.ttfts_s,
                                "itl_p50_ms": percentile_ms(wave.itls_s, 50),
                                "itl_p99_ms": percentile_ms(wave.itls_s, 99)},
            "server_over_raw_loop": point.server_over_raw,
            "server_over_one_at_a_time": point.server_over(run.baseline),
            "server_peak_rss_bytes": point.server_peak_rss_bytes,
        })
    baseline = run.baseline
    return {
        "machine": run.machine, "model": run.model, "workload": run.workload, "server": run.server,
        "one_at_a_time": baseline and {"tokens_per_s": baseline.tokens_per_s, "requests": baseline.requests,
                                       "generated_tokens": baseline.generated_tokens, "seconds": baseline.seconds},
        "single_prefill_s": run.single_prefill_s, "ttft_target_ms": run.ttft_target_ms, "notes": run.notes,
        "roofline_tokens_per_s": run.roofline_tokens_per_s,
        "copy_bandwidth_bytes_per_s": run.copy_bandwidth_bytes_per_s,
        "sampled": run.sampled and {"streams": run.sampled.concurrency, "tokens_per_s": run.sampled.tokens_per_s},
        "points": points,
    }


def write(run: BenchRun, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.md").write_text(markdown(run))
    (directory / "results.json").write_text(json.dumps(as_json(run), indent=2) + "\n")
    plot(run, directory / "results.png")
    return directory / "results.md"


def ratio_line(run: BenchRun) -> str:
    point = run.headline_point
    return f"ratio_vs_raw_loop: {fmt(point.server_over_raw if point else None, 2)}"

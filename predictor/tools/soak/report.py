"""A soak's results: a markdown table of outcomes per request kind, with the server's state before and after,
and the same as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from predictor.tools.soak.abusive import ABUSES, AbuseTally
from predictor.tools.soak.clients import LEFT, Tally, is_server_error
from predictor.tools.soak.gauges import ServerState
from predictor.tools.soak.mix import KINDS


@dataclass
class SoakRun:
    machine: dict[str, str]
    server: str
    load: str
    tally: Tally
    abuse: AbuseTally
    probes: list[float]  # readiness probe latencies in seconds, inf for one that failed
    before: ServerState
    after: ServerState
    settle_s: float
    peak_rss_bytes: int | None  # VmHWM of a local server; None for a given one
    still_serves: bool  # a completion and the readiness probe answered 200 after the run

    @property
    def server_errors(self) -> int:
        return self.tally.count(is_server_error) + self.abuse.count(is_server_error)

    def probe_ms(self) -> dict[str, float | int]:
        """Count, failures, p50, p99 and max, in milliseconds."""
        answered = sorted(p for p in self.probes if math.isfinite(p))
        if not answered:
            return {"count": len(self.probes), "failed": len(self.probes)}
        at = lambda q: round(1000 * answered[min(len(answered) - 1, int(q * len(answered)))], 1)  # noqa: E731
        return {"count": len(self.probes), "failed": len(self.probes) - len(answered), "p50": at(0.5),
                "p99": at(0.99), "max": round(1000 * answered[-1], 1)}

    @property
    def passed(self) -> bool:
        return self.server_errors == 0 and self.after.idle and self.still_serves


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def columns(tally: Tally | AbuseTally) -> list[int | str]:
    """Every status seen, in order, then the clients that left; other outcomes (server errors) last."""
    seen = {outcome for counts in tally.outcomes.values() for outcome in counts}
    statuses = sorted(o for o in seen if isinstance(o, int))
    return statuses + ([LEFT] if LEFT in seen else []) + sorted(o for o in seen if isinstance(o, str) and o != LEFT)


def markdown_table(tally: Tally | AbuseTally, names) -> str:
    heads = columns(tally)
    lines = ["| request | sent | " + " | ".join(map(str, heads)) + " |", "|---|" + "---|" * (len(heads) + 1)]
    for name in names:
        counts = tally.outcomes[name]
        cells = [str(counts.get(head, 0)) for head in heads]
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(cells) + " |")
    totals = [str(sum(c.get(head, 0) for c in tally.outcomes.values())) for head in heads]
    lines.append(f"| **all** | {tally.total} | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def summary_lines(run: SoakRun) -> list[str]:
    tally, after, probes = run.tally, run.after, run.probe_ms()
    return [
        f"- requests: {tally.total} in {tally.wall_s:.1f} s, and {run.abuse.total} from abusive peers; server errors "
        f"(5xx, errors inside a 200, no answer): {run.server_errors}; clients that left midway: "
        f"{tally.count(lambda o: o == LEFT)}",
        f"- readiness probes (GET /v2/health/ready every 50 ms, from a process of their own): {probes['count']}, "
        f"{probes['failed']} failed" + (f"; p50 {probes['p50']} ms, p99 {probes['p99']} ms, max {probes['max']} ms"
                                        if "p50" in probes else ""),
        f"- well-formed requests refused (other than 429) or bad ones served: {len(tally.unexpected)} sampled",
        f"- server RSS: {mib(run.before.rss_bytes)} MiB at start, {mib(after.rss_bytes)} MiB at end"
        + (f", peak {mib(run.peak_rss_bytes)} MiB" if run.peak_rss_bytes else ""),
        f"- after the run: running {_g(after.running)}, waiting {_g(after.waiting)}, KV cache in use "
        f"{_g(after.kv_cache_usage)} ({'settled' if after.idle else 'NOT settled'} {run.settle_s:.1f} s after the "
        f"last answer); a completion and readiness afterwards: {'200' if run.still_serves else 'FAILED'}",
        f"- verdict: {'PASS' if run.passed else 'FAIL'}",
    ]


def markdown(run: SoakRun) -> str:
    lines = [
        "# llm-predictor soak",
        "",
        *(f"- {key}: {value}" for key, value in run.machine.items()),
        f"- server: {run.server}",
        f"- load: {run.load}",
        *summary_lines(run),
        "",
        markdown_table(run.tally, [kind.name for kind in KINDS]),
        "",
        f"Columns are HTTP statuses; '{LEFT}' counts requests whose client hung up on purpose (mid-stream, or "
        "before a non-streamed answer). Rows starting 'bad:' should all be 4xx; the others 200 (or 429 when the "
        "queue is full).",
        "",
        "## Abusive peers",
        "",
        markdown_table(run.abuse, ABUSES),
        "",
        "Slow headers should end in 408 (after --header_timeout) unless the run ended first, huge headers in 431; "
        "abandoned embeddings are left after 0.3 s; big grammars are 200 (or 400 where structured output is off).",
        "",
    ]
    server_errors = run.tally.server_errors + run.abuse.server_errors
    for title, samples in (("Server errors", server_errors), ("Unexpected answers", run.tally.unexpected)):
        if samples:
            lines += [f"## {title} (sample)", "", *(f"- {s['request']}: {s['outcome']} {s['body']!r}" for s in samples),
                      ""]
    return "\n".join(lines)


def as_json(run: SoakRun) -> dict:
    return {
        "machine": run.machine, "server": run.server, "load": run.load, "passed": run.passed,
        "requests": run.tally.total, "wall_s": run.tally.wall_s, "server_errors": run.server_errors,
        "outcomes": {name: {str(k): v for k, v in counts.items()} for name, counts in run.tally.outcomes.items()},
        "abusive_peers": {name: {str(k): v for k, v in counts.items()} for name, counts in run.abuse.outcomes.items()},
        "probe_ms": run.probe_ms(),
        "before": run.before.as_dict(), "after": run.after.as_dict(), "settle_s": run.settle_s,
        "peak_rss_bytes": run.peak_rss_bytes, "still_serves": run.still_serves,
        "server_error_samples": run.tally.server_errors + run.abuse.server_errors,
        "unexpected_samples": run.tally.unexpected,
    }


def write(run: SoakRun, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.md").write_text(markdown(run))
    (directory / "results.json").write_text(json.dumps(as_json(run), indent=2) + "\n")
    return directory / "results.md"


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"

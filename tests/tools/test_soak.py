"""`llm-predictor soak` end to end on the tiny model, briefly: it sends every kind of request, writes its table
and JSON, and finds the server settled. Counts, not speeds: nothing here depends on how fast the machine is."""

from __future__ import annotations

import json

from servers import predictor_env

from predictor.__main__ import main
from predictor.tools.soak.abusive import ABUSES, OPEN_AT_END
from predictor.tools.soak.clients import LEFT
from predictor.tools.soak.mix import KINDS


def test_a_short_soak_passes_and_reports_every_request_kind(tiny_llama, tmp_path, capsys, monkeypatch):
    for key, value in predictor_env().items():  # what the test servers run with: offline, 2 threads
        monkeypatch.setenv(key, value)
    code = main(["soak", "--model_dir", str(tiny_llama), "--model", "tiny", "--clients", "6", "--duration", "4",
                 "--disconnect_rate", "0.3", "--results_dir", str(tmp_path), "--abusive_peers", "4",
                 "--server_args", "--chat_template=llama-2 --max_num_seqs=8 --header_timeout=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "- verdict: PASS"

    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["passed"] and results["server_errors"] == 0 and results["still_serves"]
    assert results["after"]["running"] == results["after"]["waiting"] == results["after"]["kv_cache_usage"] == 0
    assert results["before"]["rss_bytes"] > 0 and results["after"]["rss_bytes"] > 0
    assert set(results["outcomes"]) == {kind.name for kind in KINDS}
    sent = sum(sum(counts.values()) for counts in results["outcomes"].values())
    assert sent == results["requests"] > 0
    for kind in KINDS:  # whatever was sent of each kind got the answer its kind calls for
        statuses = {int(s) for s in results["outcomes"][kind.name] if s.isdigit()}
        assert all(400 <= s < 500 for s in statuses) if kind.bad else statuses <= {200, 429}, (kind.name, statuses)

    abuse = results["abusive_peers"]  # each refused as it should be, or left by its client
    assert set(abuse) == set(ABUSES) and sum(sum(counts.values()) for counts in abuse.values()) > 0
    expected = {"slow headers": {"408", OPEN_AT_END}, "huge header": {"431"},
                "abandoned embeddings": {"200", LEFT}, "big grammar": {"200", "400"}}
    for name, outcomes in abuse.items():
        assert set(outcomes) <= expected[name], (name, outcomes)
    probes = results["probe_ms"]  # timed, not judged: how fast depends on the machine
    assert probes["count"] > 0 and probes["failed"] == 0 and probes["p50"] <= probes["p99"] <= probes["max"]

    table = (run_dir / "results.md").read_text()
    assert all(f"| {kind.name} |" in table for kind in KINDS)
    assert "## Abusive peers" in table and all(f"| {name} |" in table for name in ABUSES)
    assert "| **all** |" in table and "verdict: PASS" in table

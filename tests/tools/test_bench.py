"""`llm-predictor bench --quick` end to end on the tiny model: it writes the table and plot and prints the ratio."""

from __future__ import annotations

import re

import pytest
import torch
from servers import predictor_env

from predictor.__main__ import main
from predictor.tools.bench import kernel as kernel_bench
from predictor.tools.bench.workload import build_workload, parse_range

NUMBER = r"\d+(?:\.\d+)?"


def test_prompts_have_the_exact_token_lengths_asked_for(reference):
    _, tokenizer = reference
    requests = build_workload(tokenizer, 16, (32, 256), (64, 128), seed=0)
    assert requests == build_workload(tokenizer, 16, (32, 256), (64, 128), seed=0)
    for request in requests:
        assert 32 <= len(request.prompt_ids) <= 256 and 64 <= request.max_tokens <= 128
        assert tokenizer(request.prompt).input_ids == request.prompt_ids


def test_parse_range():
    assert parse_range("64-128") == (64, 128)
    assert parse_range("128") == (128, 128)
    with pytest.raises(ValueError):
        parse_range("9-3")


def test_quick_bench_writes_table_plot_and_ratio(tiny_llama, tmp_path, capsys, monkeypatch):
    for key, value in predictor_env().items():  # what the test servers run with: offline, 2 threads
        monkeypatch.setenv(key, value)
    code = main(["bench", "--quick", "--model_dir", str(tiny_llama), "--model", "tiny", "--concurrency", "1,2",
                 "--results_dir", str(tmp_path)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"ratio_vs_raw_loop: {NUMBER}", lines[-1]) and float(lines[-1].split()[-1]) > 0

    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in (run_dir / "results.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    header = next(line for line in (run_dir / "results.md").read_text().splitlines() if line.startswith("| streams"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for row in rows:
        cells = dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        assert all(re.fullmatch(NUMBER, cell) for cell in cells.values()), row
        # Latencies may round to 0.0 ms on the tiny model (chunks read in one go); rates and sizes may not.
        assert all(float(cell) > 0 for column, cell in cells.items() if " ms" not in column), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it measures the kernel (build/device_check.sh)")
def test_kernel_bench_says_it_needs_cuda_and_succeeds_without_it(capsys):
    assert kernel_bench.main() == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "needs CUDA" in line


def test_shared_prefix_bench_reports_ttft_and_cached_tokens(server, tiny_llama, tmp_path, capsys):
    """Against a running server (a local run starts one with prefix caching and one without, the same way)."""
    code = main(["bench", "--shared_prefix_tokens", "100", "--url", server.url, "--model", server.model_name,
                 "--model_dir", str(tiny_llama), "--results_dir", str(tmp_path)])
    assert code == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| as served")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(re.fullmatch(NUMBER, cell) and float(cell) > 0 for cell in cells[1:4]), row
    assert cells[4] == "96"  # the second prompt found the 100-token prefix's whole 16-token blocks cached
    (run_dir,) = tmp_path.iterdir()
    assert row in (run_dir / "shared-prefix.md").read_text()

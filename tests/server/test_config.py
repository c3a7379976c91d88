"""Settings precedence (CLI > env > YAML > defaults) and one-line refusals of bad configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest
from servers import REPO, predictor_env

from predictor.config import ConfigError, load_settings


def test_cli_beats_env_beats_yaml_beats_defaults(tmp_path, monkeypatch):
    config = tmp_path / "predictor.yaml"
    config.write_text("max_num_seqs: 7\nmax_queue: 3\ndtype: bfloat16\n")
    monkeypatch.setenv("PREDICTOR_MAX_QUEUE", "5")
    settings = load_settings([f"--config={config}", "--dtype=float32"])
    assert (settings.max_num_seqs, settings.max_queue, settings.dtype) == (7, 5, "float32")
    assert settings.max_model_len is None and settings.http_port == 8080
    assert str(settings.model_dir) == "/mnt/models"


def test_kv_cache_bytes_accepts_units():
    assert int(load_settings(["--kv_cache_bytes=512MiB"]).kv_cache_bytes) == 512 * 1024**2


def test_prefix_caching_is_on_unless_turned_off(monkeypatch):
    assert load_settings([]).enable_prefix_caching
    assert not load_settings(["--no-enable_prefix_caching"]).enable_prefix_caching
    monkeypatch.setenv("PREDICTOR_ENABLE_PREFIX_CACHING", "false")
    assert not load_settings([]).enable_prefix_caching
    assert load_settings(["--enable_prefix_caching"]).enable_prefix_caching


def test_async_scheduling_is_off_unless_turned_on():
    assert not load_settings([]).async_scheduling
    assert load_settings(["--async_scheduling"]).async_scheduling


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--max_num_seqs=0"], "max_num_seqs"),
        (["--dtype=int8"], "dtype"),
        (["--device=tpu"], "device"),
        (["--tensor_parallel_size=0"], "tensor_parallel_size"),
        (["--kv_cache_bytes=lots"], "kv_cache_bytes"),
        (["--chat_template=nonexistent"], "chat_template"),
        (["--config=/no/such.yaml"], "config"),
        (["--no_such_flag=1"], "--no_such_flag"),
        (["--enable_grpc", "--host=127.0.0.1"], "host: .*gRPC server always listens on every interface"),
        (["--shutdown_timeout=-1"], "shutdown_timeout"),
        (["--tensor_parallel_size=2", "--async_scheduling"], "async_scheduling: .*tensor_parallel_size 1"),
    ],
)
def test_invalid_settings_name_the_setting(argv, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(argv)


def test_invalid_configuration_exits_nonzero_with_one_line():
    result = subprocess.run([sys.executable, "-m", "predictor", "--max_queue=-1"], cwd=REPO, env=predictor_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "llm-predictor: invalid setting max_queue: Input should be greater than or equal to 0 (got '-1')"
    ]


def test_missing_model_dir_exits_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "predictor", f"--model_dir={tmp_path}/none", "--http_port=18999"],
                            cwd=REPO, env=predictor_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "has no config.json" in result.stderr

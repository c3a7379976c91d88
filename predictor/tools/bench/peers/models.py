"""The models the peers are measured on: the demo model, and a host-bound one whose forward costs next to nothing,
so that what a server spends around the model (scheduling, tokenizing, detokenizing, HTTP) decides its speed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from predictor.tools.bench.shapes import TOKENIZER_FILES
from predictor.tools.demo import DEMO_ARCHITECTURE, ensure_demo_model, save_random_llama

# One layer, hidden 64: two heads of 32 (a head size vLLM's CPU attention takes); the demo's Llama-2 vocabulary.
HOST_BOUND_ARCHITECTURE = dict(DEMO_ARCHITECTURE, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
HOST_BOUND = "host-bound"
DEMO = "demo"


def ensure_host_bound_model(root: Path) -> Path:
    """The host-bound Llama with random weights (seed 0) and the demo model's tokenizer, saved under root once."""
    target = root / "host-bound-1x64"
    if (target / "model.safetensors").is_file():
        return target
    demo = ensure_demo_model()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root))
    save_random_llama(staging, HOST_BOUND_ARCHITECTURE, seed=0)
    for file in TOKENIZER_FILES:
        if (demo / file).is_file() and not (staging / file).exists():
            shutil.copy(demo / file, staging / file)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def resolve(name: str, models_dir: Path) -> tuple[str, Path]:
    """'demo', 'host-bound' or a model directory -> (the name it is reported and served under, its directory)."""
    if name == DEMO:
        return DEMO, ensure_demo_model()
    if name == HOST_BOUND:
        return HOST_BOUND, ensure_host_bound_model(models_dir)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--models: {name} is neither 'demo', 'host-bound' nor a model directory")
    return path.name, path

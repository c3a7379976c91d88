"""Random-weight models of real shapes, made in the run (no downloads): what the GPU figures are measured on."""

from __future__ import annotations

import shutil
from pathlib import Path

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def make_shape_model(name: str, root: Path, device: str, dtype: str) -> Path:
    """A Llama of the named shape with random weights and the demo model's Llama-2 tokenizer, saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from predictor.tools.demo import ensure_demo_model

    target = root / f"{name}-{dtype}"
    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(**SHAPES[name], vocab_size=32000, bos_token_id=1, eos_token_id=2, dtype=dtype,
                         tie_word_embeddings=False)
    with torch.device(device):  # initialising 7B parameters on a GPU takes seconds, on a CPU minutes
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    demo = ensure_demo_model()
    for file in TOKENIZER_FILES:
        if (demo / file).is_file():
            shutil.copy(demo / file, partial / file)
    partial.rename(target)
    return target

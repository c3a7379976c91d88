"""A tiny random Llama with a WordLevel tokenizer, saved as the Hub would ship it (sharded safetensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

# 4 attention heads, 2 KV heads: tensor-parallel sizes 1 and 2.
TINY_CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
SHARD_SIZE = "20KB"


def make_tiny_model(path: Path) -> Path:
    """Save the model to path once; later calls with the same path reuse it."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).save_pretrained(partial, max_shard_size=SHARD_SIZE)

    vocab = {f"w{i}": i for i in range(60)} | {"<unk>": 60, "<s>": 61, "</s>": 62, "<pad>": 63}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(partial)
    partial.rename(path)
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

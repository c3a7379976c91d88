"""Reads catalog.yaml (package data beside this module), the model catalog shared by the image build and the chart."""

from __future__ import annotations

from pathlib import Path

import yaml

DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog.yaml"

REQUIRED_FIELDS = (
    "hf_repo", "architecture", "num_hidden_layers", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_context", "dtype", "weight_bytes", "gpu_memory_bytes",
    "kv_bytes_per_token", "tensor_parallel_sizes", "default_tensor_parallel_size", "chat_template",
)


class CatalogError(Exception):
    """The catalog file is missing or malformed; the message is one line."""


def load_catalog(path: str | Path | None = None) -> dict[str, dict]:
    """The catalog's models by name, each with every field of REQUIRED_FIELDS."""
    path = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: model catalog not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: unreadable model catalog ({exc})".replace("\n", " ")) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise CatalogError(f"{path}: expected a non-empty 'models' mapping")
    for name, entry in models.items():
        missing = [f for f in REQUIRED_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise CatalogError(f"{path}: model {name!r} lacks {', '.join(missing)}")
    return models

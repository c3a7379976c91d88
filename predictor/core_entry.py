"""Where the engine core's process starts: a module that imports nothing at load, so that the HTTP process can
spawn the core first thing, before it imports the server (the core's own imports and model load then overlap
the HTTP process's)."""

from __future__ import annotations


def run_core(*args) -> None:
    from predictor.core_process import run_core as run

    run(*args)

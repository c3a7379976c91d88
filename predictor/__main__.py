"""llm-predictor: parse the settings and wire the pieces; subcommands `manifest`, `bench`, `bench-peers`
and `soak`."""

from __future__ import annotations

import sys

from predictor import logs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.configure()
    if argv[:1] == ["manifest"]:
        from predictor.tools.manifest import manifest_main

        return manifest_main(argv[1:])
    if argv[:1] == ["bench"]:
        from predictor.tools.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["bench-peers"]:
        from predictor.tools.bench.peers.cli import main as bench_peers_main

        return bench_peers_main(argv[1:])
    if argv[:1] == ["soak"]:
        from predictor.tools.soak.cli import main as soak_main

        return soak_main(argv[1:])

    from predictor.config import ConfigError, load_settings
    from predictor.engine.launcher import launch_local_ranks
    from predictor.engine.tp import rank_from_env

    try:
        settings = load_settings(argv)
    except ConfigError as err:
        print(f"llm-predictor: {err}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format)
    if not settings.serves_demo and not (settings.model_dir / "config.json").is_file():
        print(f"llm-predictor: model_dir: {settings.model_dir} has no config.json", file=sys.stderr)
        return 2
    rank = rank_from_env()
    if rank is None and settings.tensor_parallel_size > 1:
        from predictor.loader import LoadError, check_tensor_parallel_size, load_config

        if not settings.serves_demo:  # refuse before starting ranks that would all fail the same way
            try:
                check_tensor_parallel_size(load_config(settings.model_dir), settings.tensor_parallel_size)
            except LoadError as err:
                print(f"llm-predictor: {err}", file=sys.stderr)
                return 2
        return launch_local_ranks(settings.tensor_parallel_size, argv)
    if rank is not None and rank.world_size != settings.tensor_parallel_size:
        print(
            f"llm-predictor: tensor_parallel_size {settings.tensor_parallel_size} differs from the "
            f"{rank.world_size} ranks torchrun started",
            file=sys.stderr,
        )
        return 2

    from predictor.cpu_quota import fit_threads_to_quota

    fit_threads_to_quota()  # before the core starts, which inherits it; a TP rank has it from its launcher
    if rank is None or rank.leads:
        from predictor.core_entry import run_core
        from predictor.engine.core_client import ProcessCore

        core = ProcessCore(run_core, settings, rank)  # first: it imports and loads while the server is set up
        from predictor.serving import serve

        return serve(settings, core)
    from predictor.serving import run_follower

    return run_follower(settings, rank)


if __name__ == "__main__":
    sys.exit(main())

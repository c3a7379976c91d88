"""Build one image per model, with its weights baked in at /mnt/models.

    make image MODEL=<catalog name | model dir> TAG=<registry/repo:tag> [PUSH=1]

MODEL is a model directory, the name `demo` (the embedded CPU demo model), or a name from the catalog
(predictor/tools/catalog.yaml) whose weights directory is given with --model_dir or MODEL_DIR (weights are never
downloaded here).
The script validates the weights, stages build/context/, writes model/model-manifest.json there, and builds
with docker buildx, podman or buildah, whichever works first. Registry credentials come from the engine's
own login, or REGISTRY_USERNAME / REGISTRY_PASSWORD for a login just before the push; they never reach the
build. Exit codes: 0 built, 1 bad input or a failed build, 3 no container engine (the command is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from predictor.tools.catalog import CatalogError, load_catalog  # noqa: E402 - after the sys.path insert
from predictor.tools.manifest import (  # noqa: E402
    ManifestError,
    architecture_facts,
    manifest_digest,
    model_files,
    validate_model_dir,
    write_manifest,
)

WHEEL_SOURCES = ("pyproject.toml", "README.md", "predictor")
CPU_BASE_IMAGE = "python:3.11-slim"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CMD_PLACEHOLDER = '"--model_name=model"'
CATALOG_FACTS = ("architecture", "num_hidden_layers", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")
EXIT_NO_ENGINE = 3


class BuildError(Exception):
    """The image cannot be built from what was given; the message is one line."""


# --- the model ----------------------------------------------------------------------------------------


def image_model_name(name: str) -> str:
    """A name that is safe in the image's CMD and labels, and as a KServe model name."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    if not cleaned:
        raise BuildError(f"cannot make a model name out of {name!r}: pass --model_name")
    return cleaned


def resolve_model(model: str, model_dir: str | None, catalog: dict) -> tuple[str, Path, dict | None]:
    """(model name, weights directory, catalog entry or None) for MODEL."""
    if model == "demo" and not model_dir:
        try:
            from predictor.tools.demo import ensure_demo_model
        except ImportError as exc:
            raise BuildError(f"the demo model needs predictor.tools.demo, which does not import ({exc})") from None
        return "demo", Path(ensure_demo_model()), catalog.get("demo")
    if model in catalog:
        model_dir = model_dir or os.environ.get("MODEL_DIR")
        if not model_dir:
            raise BuildError(f"{model}: weights are not downloaded here; give their directory with "
                             f"--model_dir DIR or MODEL_DIR=DIR (Hub repo: {catalog[model]['hf_repo']})")
        path = Path(model_dir)
        if not path.is_dir():
            raise BuildError(f"{path}: not a directory (weights of {model})")
        return model, path, catalog[model]
    path = Path(model)
    if path.is_dir():
        return path.resolve().name, path, None
    raise BuildError(f"{model}: neither a directory nor a model in the catalog (predictor/tools/catalog.yaml) "
                     f"(known: {', '.join(sorted(catalog))})")


def check_against_catalog(model_dir: Path, name: str, entry: dict) -> None:
    facts = architecture_facts(model_dir)
    for field in CATALOG_FACTS:
        if facts[field] != entry[field]:
            raise BuildError(f"{model_dir}: not {name}'s weights: {field} is {facts[field]}, "
                             f"the catalog (predictor/tools/catalog.yaml) says {entry[field]}")


def model_revision(model_dir: Path, given: str | None) -> str:
    """The given revision, else the commit of a Hub git clone, else "unknown"."""
    if given:
        return given
    if (model_dir / ".git").exists():
        result = subprocess.run(["git", "-C", str(model_dir), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return result.stdout.strip()
    return "unknown"


def predictor_version() -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    return match.group(1) if match else "unknown"


# --- the build context --------------------------------------------------------------------------------


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem: staging a 140 GB model must not copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def clear_context(context_dir: Path) -> None:
    if context_dir.exists():
        staged_before = (context_dir / "Dockerfile").is_file() or not any(context_dir.iterdir())
        if not staged_before:
            raise BuildError(f"{context_dir}: exists and is not a staged build context; not deleting it")
        shutil.rmtree(context_dir)
    context_dir.mkdir(parents=True)


def render_dockerfile(text: str, model_name: str) -> str:
    if text.count(CMD_PLACEHOLDER) != 1:
        raise BuildError(f"build/Dockerfile: expected one CMD argument {CMD_PLACEHOLDER} to fill in")
    return text.replace(CMD_PLACEHOLDER, f'"--model_name={model_name}"')


def stage_context(model_dir: Path, model_name: str, context_dir: Path) -> Path:
    """Fill context_dir with exactly what build/Dockerfile needs; the model goes to context_dir/model."""
    clear_context(context_dir)
    build_dir = REPO_ROOT / "build"
    (context_dir / "Dockerfile").write_text(render_dockerfile((build_dir / "Dockerfile").read_text(), model_name))
    shutil.copyfile(build_dir / ".dockerignore", context_dir / ".dockerignore")
    for name in WHEEL_SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, context_dir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copyfile(src, context_dir / name)
        else:
            raise BuildError(f"{src}: missing, and the predictor wheel is built from it")
    for rel in model_files(model_dir):
        link_or_copy(model_dir / rel, context_dir / "model" / rel)
    return context_dir


# --- the engines --------------------------------------------------------------------------------------


def answers(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_engine() -> tuple[str | None, list[str]]:
    """The first working engine of docker buildx, podman, buildah; and why each one before it was passed."""
    why_not = []
    if not shutil.which("docker"):
        why_not.append("docker: not installed")
    elif not answers(["docker", "buildx", "version"]):
        why_not.append("docker: no buildx plugin")
    elif not answers(["docker", "info"]):
        why_not.append("docker: no daemon answers")
    else:
        return "docker", why_not
    for engine in ("podman", "buildah"):
        if not shutil.which(engine):
            why_not.append(f"{engine}: not installed")
        elif not answers([engine, "info"]):
            why_not.append(f"{engine}: `{engine} info` fails")
        else:
            return engine, why_not
    return None, why_not


def build_commands(engine: str, context: str, tag: str, build_args: dict[str, str], push: bool,
                   platform: str | None = None) -> list[list[str]]:
    args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
    common = ["--file", f"{context}/Dockerfile", "--tag", tag, *args]
    if platform:
        common += ["--platform", platform]
    if engine == "docker":
        return [["docker", "buildx", "build", *common, "--push" if push else "--load", context]]
    commands = [[engine, "build", *common, context]]
    if push:
        commands.append([engine, "push", tag])
    return commands


def registry_of(tag: str) -> str:
    first = tag.split("/", 1)[0]
    return first if "/" in tag and ("." in first or ":" in first or first == "localhost") else "docker.io"


def login_from_env(engine: str, tag: str) -> None:
    """Log in with REGISTRY_USERNAME / REGISTRY_PASSWORD when both are set; the password goes via stdin."""
    user, password = os.environ.get("REGISTRY_USERNAME"), os.environ.get("REGISTRY_PASSWORD")
    if not (user and password):
        return
    registry = registry_of(tag)
    result = subprocess.run([engine, "login", "--username", user, "--password-stdin", registry],
                            input=password, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BuildError(f"{engine} login {registry} failed: {reason}")


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="catalog name, `demo`, or a model directory")
    parser.add_argument("--tag", required=True, help="image reference, e.g. registry.example.com/llm/demo:1")
    parser.add_argument("--push", action="store_true", help="push the image after building it")
    parser.add_argument("--model_dir", help="weights directory for a catalog name (default: $MODEL_DIR)")
    parser.add_argument("--model_name", help="name served by the predictor (default: MODEL's name)")
    parser.add_argument("--revision", default=os.environ.get("MODEL_REVISION"),
                        help="weights revision for the image label (default: $MODEL_REVISION, a git HEAD)")
    parser.add_argument("--variant", choices=("cuda", "cpu"),
                        help="CUDA runtime base, or python:3.11-slim with CPU torch (default: cpu for demo)")
    parser.add_argument("--base_image", help="override the variant's base image")
    parser.add_argument("--platform", help="target platform, e.g. linux/amd64")
    parser.add_argument("--engine", choices=("docker", "podman", "buildah"), help="skip engine detection")
    parser.add_argument("--allow_pickle", action="store_true", help="accept pickled .bin weights")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, context_dir: Path) -> dict[str, str]:
    """Resolve, validate and stage the model; returns the build args."""
    catalog = load_catalog()
    name, model_dir, entry = resolve_model(args.model, args.model_dir, catalog)
    name = image_model_name(args.model_name or name)
    validate_model_dir(model_dir, allow_pickle=args.allow_pickle)
    if entry is not None:
        check_against_catalog(model_dir, args.model, entry)
    stage_context(model_dir, name, context_dir)
    manifest = write_manifest(context_dir / "model", allow_pickle=args.allow_pickle, model_name=name)
    build_args = {
        "MODEL_NAME": name,
        "MODEL_REVISION": model_revision(model_dir, args.revision),
        "MANIFEST_DIGEST": manifest_digest(context_dir / "model"),
        "PREDICTOR_VERSION": predictor_version(),
    }
    variant = args.variant or ("cpu" if args.model == "demo" else "cuda")
    if variant == "cpu":
        build_args["BASE_IMAGE"] = CPU_BASE_IMAGE
        build_args["TORCH_INDEX_URL"] = CPU_TORCH_INDEX
    if args.base_image:
        build_args["BASE_IMAGE"] = args.base_image
    print(f"staged {display(context_dir)}: model {name} from {model_dir}, {len(manifest['files'])} files, "
          f"{manifest['total_bytes'] / 1e9:.2f} GB, manifest {build_args['MANIFEST_DIGEST']}")
    return build_args


def display(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context_dir = REPO_ROOT / "build" / "context"
    try:
        build_args = prepare(args, context_dir)
        engine, why_not = (args.engine, []) if args.engine else pick_engine()
        context = display(context_dir)
        if engine is None:
            command = build_commands("docker", context, args.tag, build_args, args.push, args.platform)[0]
            print(f"error: no container engine works here ({'; '.join(why_not)}). {context} is staged: "
                  f"where docker works, run from the directory that holds {context}:\n  "
                  + shlex.join(command), file=sys.stderr)
            return EXIT_NO_ENGINE
        if args.push:
            login_from_env(engine, args.tag)
        for command in build_commands(engine, context, args.tag, build_args, args.push, args.platform):
            print("+ " + shlex.join(command), flush=True)
            result = subprocess.run(command, cwd=REPO_ROOT, check=False)
            if result.returncode != 0:
                raise BuildError(f"`{shlex.join(command[:3])} ...` failed with exit code {result.returncode}")
    except (BuildError, ManifestError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {args.tag}" + (" and pushed it" if args.push else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

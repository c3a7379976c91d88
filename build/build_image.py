"""Build one image per model, with its weights baked in at /mnt/models.

    make image MODEL=<catalog name | model dir> TAG=<registry/repo:tag> [PUSH=1]
               [BASE_IMAGE=<image>] [PYPI_INDEX_URL=<pip index>] [TORCH_INDEX_URL=<pip index>]
               [TORCH_WHEEL=<torch-*.whl>]

MODEL is a model directory, the name `demo` (the embedded CPU demo model), or a name from the catalog
(predictor/tools/catalog.yaml) whose weights directory is given with --model_dir or MODEL_DIR (weights are never
downloaded here).
The script validates the weights, stages build/context/, writes model/model-manifest.json there, builds
with docker buildx, podman or buildah, whichever works first, and prints the image's size. Registry
credentials come from the engine's own login, or REGISTRY_USERNAME / REGISTRY_PASSWORD for a login just
before the push; they never reach the build. Exit codes: 0 built, 1 bad input or a failed build, 2 the base
image cannot be pulled (what to do instead is printed), 3 no container engine (the command is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent
REPO_ROOT = BUILD_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BUILD_DIR)]

from base_image import DEFAULT_TAG as LOCAL_BASE_IMAGE  # noqa: E402 - after the sys.path insert
from engines import EXIT_NO_ENGINE, image_size_bytes, pick_engine, pull_failure  # noqa: E402

from predictor.tools.catalog import CatalogError, load_catalog  # noqa: E402
from predictor.tools.manifest import (  # noqa: E402
    ManifestError,
    architecture_facts,
    manifest_digest,
    model_files,
    validate_model_dir,
    write_manifest,
)

WHEEL_SOURCES = ("pyproject.toml", "README.md", "predictor")
CPU_BASE_IMAGE = "debian:bookworm-slim"  # Python 3.11 from apt, as in the base that build/base_image.py makes
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CMD_PLACEHOLDER = '"--model_name=model"'
WHEELS_DIR = "wheels"  # in the context: wheels the builder stage prefers to its indexes (a CPU torch)
CA_BUNDLE = "ca/bundle.crt"  # in the context: the CA certificates the builder stage's pip trusts
EXIT_NO_BASE = 2
CATALOG_FACTS = ("architecture", "num_hidden_layers", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")


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


def host_pip_cert() -> Path | None:
    """The CA bundle this machine's pip trusts, if it is told one: what lets pip through here lets the build's."""
    if os.environ.get("PIP_CERT"):
        return Path(os.environ["PIP_CERT"])
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=False)
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    for scope in ("site", "user", "global"):  # pip's precedence, highest first
        if f"{scope}.cert" in settings:
            return Path(settings[f"{scope}.cert"].strip("'\""))
    return None


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


def check_torch_wheel(path: Path) -> Path:
    if not path.is_file():
        raise BuildError(f"{path}: no such file (--torch_wheel)")
    if not (path.name.startswith("torch-") and path.suffix == ".whl"):
        raise BuildError(f"{path}: not a torch wheel (--torch_wheel expects torch-<version>-<tags>.whl)")
    return path


def stage_context(model_dir: Path, model_name: str, context_dir: Path, wheels: tuple[Path, ...] = (),
                  ca_bundle: Path | None = None) -> Path:
    """Fill context_dir with exactly what build/Dockerfile needs; the model goes to context_dir/model."""
    clear_context(context_dir)
    for optional in (WHEELS_DIR, Path(CA_BUNDLE).parent):  # always there: the Dockerfile copies them, empty or not
        (context_dir / optional).mkdir()
    for wheel in wheels:
        link_or_copy(wheel, context_dir / WHEELS_DIR / wheel.name)
    if ca_bundle:
        shutil.copyfile(ca_bundle, context_dir / CA_BUNDLE)
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


def buildah_options() -> list[str]:
    """podman and buildah: Docker's image format, the one that keeps SHELL (the OCI format drops it, and RUN
    falls back to /bin/sh); RUN steps in a chroot, which works in unprivileged CI pods and on hosts where the
    OCI runtime cannot start containers (BUILDAH_ISOLATION, if set, chooses instead)."""
    return ["--format=docker"] + ([] if os.environ.get("BUILDAH_ISOLATION") else ["--isolation=chroot"])


def build_commands(engine: str, context: str, tag: str, build_args: dict[str, str], push: bool,
                   platform: str | None = None) -> list[list[str]]:
    args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
    common = ["--file", f"{context}/Dockerfile", "--tag", tag, *args]
    if platform:
        common += ["--platform", platform]
    if engine == "docker":
        return [["docker", "buildx", "build", *common, "--push" if push else "--load", context]]
    commands = [[engine, "build", *buildah_options(), *common, context]]
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
                        help="CUDA runtime base, or Debian with CPU torch (default: cpu for demo)")
    parser.add_argument("--base_image", help="override the variant's base image (see build/base_image.py)")
    parser.add_argument("--pypi_index_url", help="pip index to use instead of PyPI (a mirror; no credentials)")
    parser.add_argument("--torch_index_url",
                        help="extra pip index for torch (default: PyTorch's CPU index for the cpu variant)")
    parser.add_argument("--torch_wheel", type=Path,
                        help="a torch wheel file to install instead of torch from an index (e.g. a local CPU build)")
    parser.add_argument("--ca_bundle", type=Path,
                        help="CA certificates for the build's pip, where TLS to the index is intercepted or the "
                             "index is an internal mirror (default: the cert your pip uses, if set); they do not "
                             "enter the image")
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
    wheels = (check_torch_wheel(args.torch_wheel),) if args.torch_wheel else ()
    ca_bundle = args.ca_bundle or host_pip_cert()
    if ca_bundle and not ca_bundle.is_file():
        raise BuildError(f"{ca_bundle}: no such file (--ca_bundle, $PIP_CERT or pip's `cert` setting)")
    stage_context(model_dir, name, context_dir, wheels, ca_bundle)
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
        if not wheels:
            build_args["TORCH_INDEX_URL"] = CPU_TORCH_INDEX
    if args.base_image:
        build_args["BASE_IMAGE"] = args.base_image
    if args.torch_index_url:
        build_args["TORCH_INDEX_URL"] = args.torch_index_url
    if args.pypi_index_url:
        build_args["PYPI_INDEX_URL"] = args.pypi_index_url
    print(f"staged {display(context_dir)}: model {name} from {model_dir}, {len(manifest['files'])} files, "
          f"{manifest['total_bytes'] / 1e9:.2f} GB, manifest {build_args['MANIFEST_DIGEST']}")
    return build_args


def base_of(build_args: dict[str, str]) -> str:
    """The image both stages build on: the BASE_IMAGE build arg, else the Dockerfile's default."""
    if "BASE_IMAGE" in build_args:
        return build_args["BASE_IMAGE"]
    match = re.search(r"(?m)^ARG BASE_IMAGE=(\S+)", (REPO_ROOT / "build" / "Dockerfile").read_text())
    if not match:
        raise BuildError("build/Dockerfile: no `ARG BASE_IMAGE=<default>` line")
    return match.group(1)


def no_base_hint(base: str, reason: str) -> str:
    return (f"cannot pull the base image {base} ({reason}): make a local Debian base with `make base-image` and "
            f"build on it with BASE_IMAGE={LOCAL_BASE_IMAGE}, or name a copy you can reach with "
            f"BASE_IMAGE=<registry>/<image>; add TORCH_WHEEL=<torch-*.whl> where PyTorch's index is out of reach too")


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
        base = base_of(build_args)
        print(f"checking that {engine} has or can pull the base image {base}", flush=True)
        if (reason := pull_failure(engine, base, args.platform)) is not None:
            print(f"error: {no_base_hint(base, reason)}", file=sys.stderr)
            return EXIT_NO_BASE
        if args.push:
            login_from_env(engine, args.tag)
        started = time.monotonic()
        for command in build_commands(engine, context, args.tag, build_args, args.push, args.platform):
            print("+ " + shlex.join(command), flush=True)
            result = subprocess.run(command, cwd=REPO_ROOT, check=False)
            if result.returncode != 0:
                raise BuildError(f"`{shlex.join(command[:3])} ...` failed with exit code {result.returncode}")
    except (BuildError, ManifestError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {args.tag} with {engine} in {time.monotonic() - started:.0f} s"
          + (" and pushed it" if args.push else "") + describe_size(image_size_bytes(engine, args.tag)))
    return 0


def describe_size(size: int | None) -> str:
    return "" if size is None else f": {size / 1e9:.2f} GB unpacked"


if __name__ == "__main__":
    sys.exit(main())

"""Make a local Debian base image with Python 3, for building where public base images cannot be pulled.

    make base-image [BASE_TAG=localhost/debian-py:bookworm] [SUITE=bookworm] [DEBIAN_MIRROR=http://mirror/debian]

mmdebstrap builds a minimal Debian root filesystem (python3, python3-venv, ca-certificates; no compiler)
from Debian's mirror or the one given, and the first working engine of docker, podman and buildah imports it.
Then `make image BASE_IMAGE=<that tag> ...` builds on it; the image's runtime stage removes the pip wheel that
python3-venv brings. Standard library only: no virtualenv needed. Exit codes: 0 made, 1 mmdebstrap or the
import failed, 3 no container engine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import EXIT_NO_ENGINE, pick_engine  # noqa: E402 - after the sys.path insert

DEFAULT_TAG = "localhost/debian-py:bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Documentation, manual pages and translations are dead weight in a server image; licences stay.
DPKG_EXCLUDES = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
                 "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
                 "path-exclude=/usr/share/info/*")
# Imported root filesystems carry no configuration; these are what a Debian image would set.
IMAGE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class BaseImageError(Exception):
    """The base image cannot be made; the message is one line."""


def mmdebstrap_command(suite: str, tarball: Path, mirror: str | None) -> list[str]:
    return ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt={option}" for option in DPKG_EXCLUDES), suite, str(tarball), *([mirror] if mirror else [])]


def import_commands(engine: str, tarball: Path, tag: str, labels: dict[str, str]) -> list[list[str]]:
    """The engine's commands that turn a root filesystem tarball into the image `tag`."""
    settings = [f"ENV {key}={value}" for key, value in IMAGE_ENV.items()]
    settings += [f"LABEL {key}={value}" for key, value in labels.items()]
    if engine in ("docker", "podman"):
        return [[engine, "import", *(f"--change={setting}" for setting in settings), str(tarball), tag]]
    # buildah has no import: a working container from scratch, the tarball added (and unpacked), committed.
    container = tarball.parent.name  # a fresh temporary directory: no clash with a concurrent run
    config = [f"--env={key}={value}" for key, value in IMAGE_ENV.items()]
    config += [f"--label={key}={value}" for key, value in labels.items()]
    return [["buildah", "from", "--name", container, "scratch"],
            ["buildah", "add", container, str(tarball), "/"],
            ["buildah", "config", *config, container],
            ["buildah", "commit", "--rm", "--quiet", container, tag]]


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise BaseImageError(f"`{' '.join(command[:2])} ...` failed with exit code {result.returncode}")


def make_base_image(engine: str, tag: str, suite: str, mirror: str | None) -> None:
    if not shutil.which("mmdebstrap"):
        raise BaseImageError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    labels = {"llm-predictor.base.suite": suite, "llm-predictor.base.packages": ",".join(PACKAGES)}
    with tempfile.TemporaryDirectory(prefix="base-image-") as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        run(mmdebstrap_command(suite, tarball, mirror))
        for command in import_commands(engine, tarball, tag, labels):
            run(command)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="base_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image to make (default: {DEFAULT_TAG})")
    parser.add_argument("--suite", default="bookworm", help="Debian release (default: bookworm, Python 3.11)")
    parser.add_argument("--mirror", help="Debian mirror URL (default: deb.debian.org with security updates)")
    parser.add_argument("--engine", choices=("docker", "podman", "buildah"), help="skip engine detection")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine, why_not = (args.engine, []) if args.engine else pick_engine()
    if engine is None:
        print(f"error: no container engine works here ({'; '.join(why_not)})", file=sys.stderr)
        return EXIT_NO_ENGINE
    try:
        make_base_image(engine, args.tag, args.suite, args.mirror)
    except BaseImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"made {args.tag} with {engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The container engines the build scripts drive: docker (buildx), podman, buildah; the first that works wins.

Standard library only, so that build/base_image.py runs before the project's virtualenv exists.
"""

from __future__ import annotations

import json
import shutil
import subprocess

EXIT_NO_ENGINE = 3


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


def inspect_image(engine: str, image: str) -> dict | None:
    """The engine's description of a local image, None when it has no such image. podman and buildah share one
    store; `buildah inspect` gives its manifest and a Docker-style config, `<engine> image inspect` the rest."""
    command = ["buildah", "inspect", "--type", "image", image] if engine == "buildah" else \
        [engine, "image", "inspect", image]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    described = json.loads(result.stdout)
    return described[0] if isinstance(described, list) else described


def pull_failure(engine: str, image: str, platform: str | None = None) -> str | None:
    """Why the engine cannot have `image` to build on, in its own words (its last line of error); None when it has
    the image or can pull it. podman and buildah pull it now, as their build would have; for docker, buildx asks the
    registry for the manifest only, since its builder may keep its own store."""
    if inspect_image(engine, image) is not None:
        return None
    if engine == "docker":
        command = ["docker", "buildx", "imagetools", "inspect", image]
    else:
        command = [engine, "pull", "--quiet", *(["--platform", platform] if platform else []), image]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or [f"{command[0]} exited with {result.returncode}"])[-1]


def image_config(engine: str, image: str) -> dict:
    """The image's config (Entrypoint, Cmd, User, Env, Labels); an empty dict when there is no such image."""
    described = inspect_image(engine, image) or {}
    if engine == "buildah":
        return described.get("Docker", {}).get("config") or {}
    return described.get("Config") or {}


def image_size_bytes(engine: str, image: str) -> int | None:
    """The image's unpacked size in the engine's store, None if it has no such image."""
    described = inspect_image(engine, image)
    if described is None:
        return None
    if engine == "buildah":  # `buildah images` rounds; the manifest lists every layer's size
        return sum(layer["size"] for layer in json.loads(described["Manifest"])["layers"])
    return described["Size"]

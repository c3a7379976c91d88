"""The demo image built for real and started (issue 13): it serves, as uid 1000, weights it cannot change.

The image is built once for this module with the first working engine (docker buildx, podman, buildah), on
the local Debian base that build/base_image.py makes (made here when missing and mmdebstrap is installed;
IMAGE_TEST_BASE names another base), with this venv's torch wheel when it is a local CPU build pip can fetch
again. It runs with buildah's chroot isolation where buildah is installed (what works on a host whose OCI
runtime cannot start containers), else with `docker run` / `podman run`. Skipped, with the reason, only when
no engine works.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from servers import free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "build"))  # the build scripts, importable as modules
build_image = importlib.import_module("build_image")
base_image = importlib.import_module("base_image")
engines = importlib.import_module("engines")

MODEL_NAME = "demo"
WEIGHTS = "/mnt/models/model.safetensors"
READY_TIMEOUT_S = 180

# Run inside the image: every compiler and every pip its filesystem holds, pip in /opt/venv apart.
FIND_BUILD_TOOLS = r"""
import fnmatch, json, os, subprocess, sys
COMPILERS = ("cc", "c++", "gcc", "gcc-[0-9]*", "*-gcc", "*-gcc-[0-9]*", "g++*", "*-g++*", "clang*", "tcc", "cc1*")
PIP = ("pip", "pip[0-9]*", "pip-*")
found = {"compilers": [], "pip": [], "pip_in_venv": []}
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    for name in files + dirs:
        path = os.path.join(root, name)
        if any(fnmatch.fnmatch(name, p) for p in COMPILERS) and os.path.isfile(path) and os.access(path, os.X_OK):
            found["compilers"].append(path)
        if any(fnmatch.fnmatch(name, p) for p in PIP):
            found["pip_in_venv" if path.startswith("/opt/venv/") else "pip"].append(path)
system_python = os.path.join(sys.base_prefix, "bin", "python3")
if subprocess.run([system_python, "-c", "import pip"], capture_output=True).returncode == 0:
    found["pip"].append(system_python + " imports pip")
print(json.dumps(found))
"""

# Run inside the image as its user: what Triton does on a GPU at the first launch of a kernel, as far as a CPU
# image allows. The predictor's decode kernel runs in Triton's interpreter against plain torch attention; then
# Triton's own launcher source (what CudaLauncher compiles per kernel) is built by triton.runtime.build with the
# compiler and Python.h Triton finds, into an empty cache, and imported. There is no libcuda.so.1 here, so the
# link leaves its symbols open and the import resolves them lazily (on a GPU they resolve at the first launch).
TRITON_BUILDS_ITS_LAUNCHER = r"""
import json, os, shutil, sys, sysconfig, tempfile
os.environ["TRITON_INTERPRET"] = "1"  # read when predictor.engine.triton_attention is imported
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # empty: the launcher is compiled now, not found
import torch
from triton.backends.nvidia import driver
from triton.runtime.build import compile_module_from_src
from predictor.engine.triton_attention import paged_decode_attention

generator = torch.Generator().manual_seed(0)
heads, kv_heads, dim, block, length = 4, 2, 16, 16, 20
k_cache, v_cache = (torch.randn(4, block, kv_heads, dim, generator=generator) for _ in range(2))
q = torch.randn(1, heads, dim, generator=generator)
table = torch.tensor([[2, 0]])
out = paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([length]), 0.25)
keys, values = (cache[table[0]].flatten(0, 1)[:length].repeat_interleave(heads // kv_heads, dim=1)
                for cache in (k_cache, v_cache))
weights = torch.softmax(torch.einsum("hd,thd->ht", q[0], keys) * 0.25, dim=-1)
expected = torch.einsum("ht,thd->hd", weights, values)

compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # triton.runtime.build's order
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
source = driver.make_launcher({}, {0: "*fp32", 1: "*fp32", 2: "i32"}, None)
sys.setdlopenflags(os.RTLD_LAZY)
launcher = compile_module_from_src(source, "__triton_launcher", include_dirs=driver.include_dirs)
print(json.dumps({"kernel_max_error": (out[0] - expected).abs().max().item(), "compiler": compiler,
                  "python_h": os.path.isfile(os.path.join(include, "Python.h")) and include,
                  "launcher": launcher.__file__, "launch": callable(launcher.launch)}))
"""

# Run inside the image as its user: every way of changing /mnt/models; each one must be refused.
TRY_TO_CHANGE_WEIGHTS = r"""
import json, os
attempts = {
    "create": lambda: open("/mnt/models/new-file", "x").close(),
    "append": lambda: open("/mnt/models/config.json", "ab").close(),
    "unlink": lambda: os.unlink("/mnt/models/config.json"),
    "rename": lambda: os.rename("/mnt/models/config.json", "/mnt/models/config.old"),
    "chmod": lambda: os.chmod("/mnt/models/model.safetensors", 0o777),
}
outcome = {}
for what, attempt in attempts.items():
    try:
        attempt()
        outcome[what] = "allowed"
    except OSError as exc:
        outcome[what] = type(exc).__name__
print(json.dumps({"uid": os.getuid(), "outcome": outcome}))
"""

# A layer on top of the image that flips one bit of the weights' last byte: the size stays, the sha256 not.
TAMPER_DOCKERFILE = f"""\
ARG IMAGE
FROM ${{IMAGE}}
USER 0:0
RUN python3 -c "f = open('{WEIGHTS}', 'r+b'); f.seek(-1, 2); b = f.read(1); f.seek(-1, 2); f.write(bytes([b[0] ^ 1]))"
USER 1000:1000
"""


# --- the engine ---------------------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs an image's processes as the image configures them (user, environment) on the host's network."""

    engine: str  # buildah: a working container run in a chroot; docker or podman: their `run`

    def command(self, image: str, argv: list[str]) -> list[str]:
        """The command that runs argv in a new container of image (for buildah, the container is made now)."""
        if self.engine == "buildah":
            container = f"image-test-{uuid.uuid4().hex[:8]}"
            subprocess.run(["buildah", "from", "--pull=never", "--name", container, image],
                           capture_output=True, check=True)
            return ["buildah", "run", "--isolation", "chroot", "--network", "host", container, "--", *argv]
        return [self.engine, "run", "--rm", "--network", "host", "--entrypoint", argv[0], image, *argv[1:]]

    def clean_up(self, command: list[str]) -> None:
        if self.engine == "buildah":
            subprocess.run(["buildah", "rm", command[command.index("--") - 1]], capture_output=True, check=False)

    def run(self, image: str, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        command = self.command(image, argv)
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
        finally:
            self.clean_up(command)


@dataclass
class Container:
    """The image's own entrypoint and command, started in the background with extra arguments."""

    runner: Runner
    command: list[str]
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, runner: Runner, image: str, config: dict, extra: list[str], log: Path) -> Container:
        command = runner.command(image, [*config["Entrypoint"], *config["Cmd"], *extra])
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(runner, command, process, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.runner.clean_up(self.command)


def base_to_build_on(engine: str) -> str | None:
    """IMAGE_TEST_BASE, else the local Debian base (made now when missing), else None: the variant's default,
    pulled from its registry, where mmdebstrap is not installed."""
    if os.environ.get("IMAGE_TEST_BASE"):
        return os.environ["IMAGE_TEST_BASE"]
    if engines.inspect_image(engine, base_image.DEFAULT_TAG) is None:
        if not shutil.which("mmdebstrap"):
            return None
        assert base_image.main(["--engine", engine]) == 0, "make base-image failed (its output is above)"
    return base_image.DEFAULT_TAG


def local_torch_wheel(directory: Path) -> Path | None:
    """This venv's torch as a wheel file, when it is a local build (2.13.0+cpu) that pip can fetch again."""
    version = importlib.metadata.version("torch")
    if "+" not in version:
        return None
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest",
                             str(directory), f"torch=={version}"], capture_output=True, check=False)
    return next(directory.glob("torch-*.whl"), None) if result.returncode == 0 else None


def server_uids(port: int) -> set[int]:
    """Real and effective uids of the predictor processes serving on `port`, as the host's /proc shows them."""
    uids = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            argv = (status.parent / "cmdline").read_bytes().split(b"\0")
            if Path(argv[0].decode()).name.startswith("python") and f"--http_port={port}".encode() in argv:
                uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
                uids.update(int(uid) for uid in uid_line.split()[1:3])
        except (OSError, StopIteration):
            continue  # a process that ended while being read
    return uids


# --- the image, built once for the module -------------------------------------------------------------


@dataclass
class BuiltImage:
    engine: str
    tag: str
    revision: str
    manifest_digest: str
    config: dict
    runner: Runner


@pytest.fixture(scope="module")
def report(request):
    """Prints past pytest's capture, so that the image's size and build time show in every run's output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, flush=True)
    return write


@pytest.fixture(scope="module")
def demo_image(tmp_path_factory, report) -> BuiltImage:
    engine, why_not = engines.pick_engine()
    if engine is None:
        pytest.skip(f"no container engine works here: {'; '.join(why_not)}")
    tag = f"localhost/llm-predictor-test/demo:{uuid.uuid4().hex[:8]}"
    revision = f"test-{uuid.uuid4().hex[:12]}"
    args = ["--model", "demo", "--tag", tag, "--variant", "cpu", "--engine", engine, "--revision", revision,
            "--pypi_index_url", "https://pypi.org/simple"]  # what an air-gapped build points at its mirror
    if base := base_to_build_on(engine):
        args += ["--base_image", base]
    if wheel := local_torch_wheel(tmp_path_factory.mktemp("wheels")):
        args += ["--torch_wheel", str(wheel)]
    started = time.monotonic()
    assert build_image.main(args) == 0, "the image build failed (its output is above)"
    build_s = time.monotonic() - started
    size = engines.image_size_bytes(engine, tag)
    report(f"\nimage {tag}: built with {engine} on {base or 'the default base'} in {build_s:.0f} s, "
           f"{size / 1e9:.2f} GB unpacked")
    runner = Runner("buildah" if engine != "docker" and shutil.which("buildah") else engine)
    yield BuiltImage(engine, tag, revision, build_image.manifest_digest(REPO / "build" / "context" / "model"),
                     engines.image_config(engine, tag), runner)
    subprocess.run([engine, "rmi", "-f", tag], capture_output=True, check=False)


@pytest.fixture(scope="module")
def tampered_image(demo_image, tmp_path_factory) -> str:
    """demo_image with one more layer, which changes one byte of the weights."""
    context = tmp_path_factory.mktemp("tamper")
    (context / "Dockerfile").write_text(TAMPER_DOCKERFILE)
    tag = f"{demo_image.tag}-tampered"
    for command in build_image.build_commands(demo_image.engine, str(context), tag, {"IMAGE": demo_image.tag},
                                              push=False):
        subprocess.run(command, capture_output=True, check=True)
    yield tag
    subprocess.run([demo_image.engine, "rmi", "-f", tag], capture_output=True, check=False)


def run_python(image: BuiltImage, script: str, tag: str | None = None) -> dict:
    result = image.runner.run(tag or image.tag, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the tests ----------------------------------------------------------------------------------------


def test_labels_carry_the_revision_and_the_baked_manifest_digest(demo_image):
    labels = demo_image.config["Labels"]
    assert labels["llm-predictor.model.name"] == MODEL_NAME
    assert labels["llm-predictor.model.revision"] == demo_image.revision
    assert labels["llm-predictor.model.manifest-digest"] == demo_image.manifest_digest
    baked = run_python(demo_image, "import json; from predictor.tools.manifest import manifest_digest; "
                                   "print(json.dumps(manifest_digest('/mnt/models')))")
    assert baked == demo_image.manifest_digest, "the label names the manifest that is in the image"


def test_serves_the_demo_from_mnt_models_as_uid_1000_with_full_verification(demo_image, tmp_path):
    config = demo_image.config
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["llm-predictor"]
    assert config["Cmd"] == ["--model_dir=/mnt/models", f"--model_name={MODEL_NAME}"]
    port = free_port()
    container = Container.start(demo_image.runner, demo_image.tag, config,
                                ["--verify_weights=full", f"--http_port={port}", f"--grpc_port={free_port()}"],
                                tmp_path / "predictor.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(container, f"{url}/v1/models/{MODEL_NAME}")
        completion = httpx.post(f"{url}/openai/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": "The weights are baked in", "max_tokens": 5, "temperature": 0})
        assert completion.status_code == 200, completion.text
        body = completion.json()
        assert body["model"] == MODEL_NAME and body["usage"]["completion_tokens"] == 5
        assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
        assert server_uids(port) == {1000}
        assert "CPU decode attention: the C kernel reads the KV blocks in place" in container.output()
    finally:
        container.stop()


def wait_ready(container: Container, model_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if container.process.poll() is not None:
            pytest.fail(f"the image's predictor exited with {container.process.returncode}:\n"
                        f"{container.output()[-3000:]}")
        try:
            if httpx.get(model_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the image's predictor was not ready after {READY_TIMEOUT_S} s:\n{container.output()[-3000:]}")


def test_the_weights_cannot_be_changed_from_inside(demo_image):
    result = run_python(demo_image, TRY_TO_CHANGE_WEIGHTS)
    assert result["uid"] == 1000
    assert result["outcome"] == {what: "PermissionError" for what in ("create", "append", "unlink", "rename", "chmod")}


def test_no_pip_outside_the_venv_and_no_compiler_beyond_gcc(demo_image):
    found = run_python(demo_image, FIND_BUILD_TOOLS)
    assert found["pip"] == []
    assert "/opt/venv/bin/pip" in found["pip_in_venv"], "the search finds pip where it is allowed"
    assert "/usr/bin/gcc" in found["compilers"], "the search finds the compiler Triton uses"
    assert [path for path in found["compilers"] if "++" in path or "clang" in path or "cc1plus" in path] == []


def test_triton_builds_its_launcher_in_the_image(demo_image, report):
    """Issue 18: without a C compiler and Python.h the first kernel launch on a GPU (the graph warm-up) fails
    and the pod crash-loops."""
    result = run_python(demo_image, TRITON_BUILDS_ITS_LAUNCHER)
    report(f"triton in the image: {json.dumps(result)}")
    assert result["kernel_max_error"] < 1e-5
    assert result["compiler"] == "/usr/bin/gcc"
    assert result["python_h"], "Python.h is where Triton looks for it"
    assert result["launcher"].endswith(".so") and result["launch"]


def test_torch_is_the_cpu_build(demo_image):
    versions = run_python(demo_image, "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda]))")
    assert versions[1] is None, f"torch {versions[0]} is a CUDA build: the CPU variant got the wrong wheel"


def test_a_tampered_weight_file_stops_the_start_naming_the_file(demo_image, tampered_image, tmp_path):
    container = Container.start(demo_image.runner, tampered_image, demo_image.config,
                                ["--verify_weights=full", f"--http_port={free_port()}", f"--grpc_port={free_port()}"],
                                tmp_path / "predictor.log")
    code = container.wait_exit(timeout=READY_TIMEOUT_S)
    assert code != 0
    assert f"{WEIGHTS}: sha256 differs from the manifest" in container.output(), container.output()[-3000:]

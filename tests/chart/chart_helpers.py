"""Shared by the chart tests (tests/chart/test_chart_*.py): run helm, pick objects out of what it rendered, and
round-trip objects through the KServe/Kubernetes SDK models."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llm-predictor"
EXAMPLES = REPO / "examples"

EXAMPLE_FILES = sorted(p.relative_to(REPO).as_posix() for p in EXAMPLES.glob("*.yaml"))
EXPECTED_EXAMPLES = {
    "examples/llama-2-7b-chat.yaml": (1, 1),  # (tensor parallel size, GPUs per pod)
    "examples/llama-2-13b.yaml": (2, 2),
    "examples/llama-2-70b.yaml": (8, 8),
    "examples/llama-2-70b-2node.yaml": (8, 4),
    "examples/falcon-7b-instruct.yaml": (1, 1),
    "examples/mistral-7b-instruct.yaml": (1, 1),
    "examples/demo-cpu.yaml": (1, 0),
}
K8S_VERSION = "1.35"
CATALOG = yaml.safe_load((REPO / "predictor" / "tools" / "catalog.yaml").read_text())["models"]
# Small base for failure cases: a 7B chat model on one 80 GiB GPU.
BASE = "examples/llama-2-7b-chat.yaml"


def find_helm() -> str | None:
    """helm from $HELM, else PATH, else the Makefile's local tools directory."""
    candidates = [os.environ.get("HELM"), shutil.which("helm"), str(REPO / ".tools" / "bin" / "helm")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


needs_helm = pytest.mark.skipif(
    find_helm() is None,
    reason="helm not found: set HELM, put helm on PATH, or run `make tools` (installs it into .tools/bin)",
)


class HelmError(Exception):
    """helm exited non-zero; the message is its output."""


def _run_helm(args: list[str]) -> str:
    helm = find_helm()
    assert helm, "helm not found"
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(f"{proc.stdout.strip()}\n{proc.stderr.strip()}".strip())
    return proc.stdout


def _values_args(values_files: tuple[str, ...], overrides: dict | None, tmpdir: str) -> list[str]:
    args: list[str] = []
    for name in values_files:
        path = Path(name)
        args += ["-f", str(path if path.is_absolute() else REPO / path)]
    if overrides:
        override_file = Path(tmpdir) / "overrides.yaml"
        override_file.write_text(yaml.safe_dump(overrides))
        args += ["-f", str(override_file)]
    return args


def template(*values_files: str, overrides: dict | None = None, sets: tuple[str, ...] = (), release: str = "t",
             namespace: str = "llm") -> list[dict[str, Any]]:
    """`helm template` the chart; the rendered objects (empty documents dropped). `sets` are `--set` arguments,
    typed as helm types them on a command line."""
    key = yaml.safe_dump(overrides) if overrides else ""
    return copy.deepcopy(list(_template_cached(values_files, key, sets, release, namespace)))  # callers may mutate


@cache
def _template_cached(values_files: tuple[str, ...], overrides_yaml: str, sets: tuple[str, ...], release: str,
                     namespace: str) -> tuple[dict[str, Any], ...]:
    overrides = yaml.safe_load(overrides_yaml) if overrides_yaml else None
    with tempfile.TemporaryDirectory() as tmpdir:
        out = _run_helm(["template", release, str(CHART), "-n", namespace,
                         *_values_args(values_files, overrides, tmpdir), *(f"--set={s}" for s in sets)])
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def template_error(*values_files: str, overrides: dict | None = None, sets: tuple[str, ...] = ()) -> str:
    """Render expecting failure; helm's error message."""
    try:
        template(*values_files, overrides=overrides, sets=sets)
    except HelmError as err:
        return str(err)
    raise AssertionError(f"helm template succeeded but should have failed (values {values_files}, {overrides}, "
                         f"--set {sets})")


def install_notes(*values_files: str, overrides: dict | None = None, release: str = "t",
                  namespace: str = "llm") -> str:
    """NOTES.txt as `helm install --dry-run=client` renders it (no cluster needed)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        out = _run_helm(["install", release, str(CHART), "-n", namespace, "--dry-run=client",
                         *_values_args(values_files, overrides, tmpdir)])
    return out.split("NOTES:", 1)[1] if "NOTES:" in out else ""


def render_extra(template_text: str, *values_files: str, overrides: dict | None = None) -> Any:
    """Render one extra template in a copy of the chart (so it can call the chart's helpers); what it
    printed, parsed as YAML (JSON is YAML too)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        chart = Path(tmpdir) / "llm-predictor"
        shutil.copytree(CHART, chart)
        (chart / "templates" / "zz-test-extra.yaml").write_text(template_text)
        out = _run_helm(["template", "t", str(chart), "-n", "llm", "--show-only", "templates/zz-test-extra.yaml",
                         *_values_args(values_files, overrides, tmpdir)])
    return yaml.safe_load(out)


def plan(*values_files: str, overrides: dict | None = None) -> dict[str, Any]:
    """The chart's deployment plan (llm-predictor.plan in _sizing.tpl) for these values."""
    return render_extra('{{ include "llm-predictor.plan" . }}\n', *values_files, overrides=overrides)


def lint(*values_files: str) -> str:
    with tempfile.TemporaryDirectory() as tmpdir:
        return _run_helm(["lint", str(CHART), "--strict", *_values_args(values_files, None, tmpdir)])


def package(dest: Path) -> Path:
    out = _run_helm(["package", str(CHART), "-d", str(dest)])
    match = re.search(r"saved it to: (\S+\.tgz)", out)
    assert match, out
    return Path(match.group(1))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj.get("kind") == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def isvc_of(objects):
    return one(objects, "InferenceService")


def container_of(objects):
    containers = isvc_of(objects)["spec"]["predictor"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]
    return containers[0]


def args_of(container) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in container["args"] if arg.startswith("--") and "=" in arg)


def pod_specs(objects) -> list[tuple[str, dict]]:
    """Every pod spec the chart renders: the predictor, the multi-node workers, the helm test pod."""
    specs = [("InferenceService", isvc_of(objects)["spec"]["predictor"])]
    specs += [("StatefulSet", s["spec"]["template"]["spec"]) for s in by_kind(objects, "StatefulSet")]
    specs += [("Pod", p["spec"]) for p in by_kind(objects, "Pod")]
    return specs


# ---------------------------------------------------------------------------------------------
# Round trip through the SDK models.
#
# KServe's SDK models (kserve.models, legacy openapi-generator classes) nest the Kubernetes client's
# models (kubernetes.client.models, pydantic classes) by name, e.g. V1beta1PredictorSpec.containers is
# 'list[V1Container]'. Neither SDK's ApiClient resolves the other's class names, so this walker
# builds the KServe layers itself and hands every Kubernetes type to the kubernetes ApiClient's own
# deserializer. A field the models do not know is dropped by them, and shows up as a difference
# when the object is serialized back and compared with what the chart rendered.
# ---------------------------------------------------------------------------------------------

# Names KServe's generated types use for Kubernetes types under another name.
_TYPE_ALIASES = {"K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy", "ResourceQuantity": "str"}
_PRIMITIVES = {"str": str, "int": int, "float": float, "bool": bool}


def _k8s_client():
    from kubernetes.client import ApiClient

    return ApiClient()


def sdk_deserialize(data: Any, klass: str) -> Any:
    import kserve.models
    import kubernetes.client.models

    if data is None:
        return None
    match = re.fullmatch(r"(?:list|List)\[(.*)\]", klass)
    if match:
        return [sdk_deserialize(item, match.group(1)) for item in data]
    match = re.fullmatch(r"dict\([^,]*, (.*)\)|Dict\[[^,]*, (.*)\]", klass)
    if match:
        sub = match.group(1) or match.group(2)
        return {key: sdk_deserialize(value, sub) for key, value in data.items()}
    klass = _TYPE_ALIASES.get(klass, klass)
    if klass in _PRIMITIVES:
        return _PRIMITIVES[klass](data)  # as the generated clients do: a wrong type changes the value
    if klass == "object":
        return data
    if hasattr(kserve.models, klass):
        cls = getattr(kserve.models, klass)
        kwargs = {attr: sdk_deserialize(data[cls.attribute_map[attr]], typ)
                  for attr, typ in cls.openapi_types.items() if cls.attribute_map[attr] in data}
        return cls(**kwargs)
    assert hasattr(kubernetes.client.models, klass), f"unknown SDK type {klass}"
    return _k8s_client()._ApiClient__deserialize(data, klass)


def sdk_serialize(obj: Any) -> Any:
    import kserve.models

    if isinstance(obj, list):
        return [sdk_serialize(item) for item in obj]
    if isinstance(obj, dict):
        return {key: sdk_serialize(value) for key, value in obj.items()}
    if type(obj).__module__.startswith(kserve.models.__name__):
        return {obj.attribute_map[attr]: sdk_serialize(getattr(obj, attr))
                for attr in obj.openapi_types if getattr(obj, attr) is not None}
    return _k8s_client().sanitize_for_serialization(obj)


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                out.append(f"{path}.{key}: lost")
            elif key not in expected:
                out.append(f"{path}.{key}: added ({actual[key]!r})")
            else:
                out += differences(expected[key], actual[key], f"{path}.{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items became {len(actual)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if expected != actual or type(expected) is not type(actual):
        return [f"{path}: {expected!r} became {actual!r}"]
    return []


def predictor_pod(isvc: dict) -> dict:
    """A Pod with the predictor's pod-spec fields, to validate them against Kubernetes' own schema."""
    import kserve.models
    from kubernetes.client.models import V1PodSpec

    pod_keys = set(V1PodSpec.attribute_map.values())
    extension_keys = set(kserve.models.V1beta1ComponentExtensionSpec.attribute_map.values())
    predictor = isvc["spec"]["predictor"]
    unknown = set(predictor) - pod_keys - extension_keys
    assert not unknown, f"predictor fields that are neither pod spec nor component extension: {unknown}"
    spec = {key: value for key, value in predictor.items() if key in pod_keys}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": spec}

"""Packaging and lint of the chart (charts/llm-predictor), and build/fetch_tools.py that installs helm."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tarfile

import chart_helpers as ch
import pytest
import yaml
from chart_helpers import EXAMPLE_FILES, EXPECTED_EXAMPLES, args_of, container_of

pytestmark = ch.needs_helm

# ------------------------------------------------------------------------------------------------
# Chart packaging and lint
# ------------------------------------------------------------------------------------------------

def test_examples_are_the_documented_set():
    assert set(EXAMPLE_FILES) == set(EXPECTED_EXAMPLES)


def test_catalog_is_a_copy_of_the_image_builds_catalog(tmp_path):
    """A file, not a symlink (helm warned "found symbolic link in path" on every command), identical to the
    catalog the image build reads, in the chart directory and in the package."""
    copy = ch.CHART / "catalog.yaml"
    catalog = ch.REPO / "predictor" / "tools" / "catalog.yaml"
    assert copy.is_file() and not copy.is_symlink()
    assert copy.read_bytes() == catalog.read_bytes(), (
        "charts/llm-predictor/catalog.yaml differs from predictor/tools/catalog.yaml, the one to edit: "
        "cp predictor/tools/catalog.yaml charts/llm-predictor/catalog.yaml")
    packaged = ch.package(tmp_path)
    with tarfile.open(packaged) as tar:
        member = tar.extractfile("llm-predictor/catalog.yaml")
        assert member is not None
        assert member.read() == catalog.read_bytes()


def test_helm_warns_about_nothing():
    helm = ch.find_helm()
    result = subprocess.run([helm, "lint", str(ch.CHART)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_lint(values):
    out = ch.lint(values)
    assert "0 chart(s) failed" in out


def test_plain_lint_passes_on_the_defaults():
    """`helm lint charts/llm-predictor` with no values: the defaults are the demo image."""
    assert "0 chart(s) failed" in ch.lint()
    container = container_of(ch.template())
    assert container["image"] == "localhost/llm/demo:" + yaml.safe_load((ch.CHART / "Chart.yaml").read_text())[
        "appVersion"]
    assert args_of(container)["model_name"] == "demo"


# ------------------------------------------------------------------------------------------------
# chart-testing's `ct lint`, check by check. ct is a Go binary that no registry reachable here ships, so these
# tests run what it runs: yamale with its chart_schema.yaml, yamllint with its lintconf.yaml (copies in
# tests/chart/chart_testing/, which ct.yaml points ct at too), `helm lint` per ci/*-values.yaml, and its version check.
# ------------------------------------------------------------------------------------------------

CT_CONFIG = yaml.safe_load((ch.REPO / "ct.yaml").read_text())
CI_VALUES = sorted(p.relative_to(ch.REPO).as_posix() for p in (ch.CHART / "ci").glob("*-values.yaml"))
YAML_LINTED = ["charts/llm-predictor/Chart.yaml", "charts/llm-predictor/values.yaml", *CI_VALUES]


def test_ct_config_finds_the_chart_and_the_rules():
    assert CT_CONFIG["chart-dirs"] == ["charts"] and (ch.REPO / "charts" / "llm-predictor" / "Chart.yaml").is_file()
    for key in ("lint-conf", "chart-yaml-schema"):
        assert (ch.REPO / CT_CONFIG[key]).is_file(), key
    # ct refuses a chart without maintainers unless their (online) validation is off.
    chart = yaml.safe_load((ch.CHART / "Chart.yaml").read_text())
    assert chart.get("maintainers") or CT_CONFIG["validate-maintainers"] is False
    assert len(CI_VALUES) >= 3, "ct lints the chart once per ci/*-values.yaml"


def test_ct_chart_yaml_schema():
    yamale = pytest.importorskip("yamale", reason="yamale is installed by `make tools`")
    schema = yamale.make_schema(str(ch.REPO / CT_CONFIG["chart-yaml-schema"]))
    data = yamale.make_data(str(ch.CHART / "Chart.yaml"))
    yamale.validate(schema, data, strict=True)  # raises YamaleError naming the field
    bad = yamale.make_data(content="name: llm-predictor\nversion: 1\napiVersion: v2\n")
    with pytest.raises(yamale.YamaleError, match="version"):
        yamale.validate(schema, bad, strict=True)


@pytest.mark.parametrize("path", YAML_LINTED)
def test_ct_yamllint(path):
    pytest.importorskip("yamllint", reason="yamllint is installed by `make tools`")
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(ch.REPO / CT_CONFIG["lint-conf"]))
    problems = [f"{path}:{p.line}:{p.column} {p.level} {p.message}"
                for p in linter.run((ch.REPO / path).read_text(), conf, path)]
    assert problems == []


@pytest.mark.parametrize("values", CI_VALUES)
def test_ct_helm_lint_with_each_ci_values_file(values):
    out = ch._run_helm(["lint", str(ch.CHART), "--values", str(ch.REPO / values)])  # as ct runs it
    assert "0 chart(s) failed" in out
    assert "0 chart(s) failed" in ch.lint(values)


def _semver(version: str) -> tuple:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?", version)
    assert match, f"chart version {version!r} is not SemVer"
    major, minor, patch, pre = match.groups()
    return int(major), int(minor), int(patch), pre is None, pre or ""  # a pre-release sorts before its release


def test_ct_version_is_bumped_when_the_chart_changed():
    """ct's check-version-increment: a chart that differs from the target branch needs a higher version."""
    version = yaml.safe_load((ch.CHART / "Chart.yaml").read_text())["version"]
    _semver(version)
    git = shutil.which("git")
    if git is None or not (ch.REPO / ".git").exists():
        pytest.skip("not a git checkout")
    branch = CT_CONFIG.get("target-branch", "main")
    for ref in (f"origin/{branch}", branch):
        base = subprocess.run([git, "merge-base", "HEAD", ref], cwd=ch.REPO, capture_output=True, text=True)
        if base.returncode == 0:
            break
    else:
        pytest.skip(f"no {branch} branch to compare with")
    base = base.stdout.strip()
    changed = subprocess.run([git, "diff", "--name-only", base, "--", "charts/llm-predictor"], cwd=ch.REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    old = subprocess.run([git, "show", f"{base}:charts/llm-predictor/Chart.yaml"], cwd=ch.REPO,
                         capture_output=True, text=True)
    if not changed or old.returncode != 0:
        return  # unchanged since the target branch, or a new chart: ct skips the check too
    old_version = yaml.safe_load(old.stdout)["version"]
    assert _semver(version) > _semver(old_version), (
        f"charts/llm-predictor changed since {ref} ({', '.join(changed)}) but its version {version} is not above "
        f"{old_version}: bump version in Chart.yaml")


# ------------------------------------------------------------------------------------------------
# build/fetch_tools.py (the download itself needs PyPI; only the offline path is tested)
# ------------------------------------------------------------------------------------------------

def test_fetch_tools_is_idempotent(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch_tools", ch.REPO / "build" / "fetch_tools.py")
    fetch_tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_tools)
    for name in ("helm", "kubectl"):
        tool = tmp_path / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
        os.utime(tool, (0, 0))

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the tools are present")

    monkeypatch.setattr(fetch_tools.subprocess, "run", no_download)
    fetch_tools.fetch(tmp_path)

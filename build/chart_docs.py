#!/usr/bin/env python3
"""Write a chart's README.md from its README.md.gotmpl, Chart.yaml and the `# --` comments of values.yaml,
the way helm-docs (github.com/norwoodj/helm-docs) does.

helm-docs is a Go binary that no package registry reachable here ships, so this is a small reimplementation of
the part of it this project uses, written from helm-docs' sources (pkg/document, pkg/helm) and producing the same
text for it:

- values: every leaf of values.yaml is a row; a `# -- description` comment right above a key describes it, and
  continuation lines (`# ...`) right after are appended with a space; `# @default -- text` replaces the default
  column; a `(type)` at the start of a description replaces the type. A described map or list is one row with
  its JSON default, and its own children then appear only where described too. Rows are sorted by key.
- templates: README.md.gotmpl is text with `{{ template "<name>" . }}` actions (with `{{-` / `-}}` trimming and
  `{{/* comments */}}`), naming helm-docs' built-in templates: chart.header, chart.deprecationWarning,
  chart.badgesSection (and chart.versionBadge, chart.typeBadge, chart.appVersionBadge), chart.description,
  chart.homepageLine, chart.maintainersSection, chart.sourcesSection, chart.requirementsSection,
  chart.valuesSection (and chart.valuesTable), and the plain fields (chart.name, chart.version, ...).
  Without README.md.gotmpl, helm-docs' default template is used.
- the output goes through helm-docs' markdown clean-up (no space before a newline, at most one empty line).

What it refuses, with a one-line error, rather than render differently from helm-docs: other template actions,
`# key.path -- description` comments, @section, @raw, @notationType and @ignore, YAML aliases.

Usage: python3 build/chart_docs.py CHART_DIR [--check]
  writes CHART_DIR/README.md; with --check, writes nothing and exits 1 when README.md differs from what it
  would write. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BADGE_STYLE = "flat-square"

DEFAULT_TEMPLATE = """{{ template "chart.header" . }}
{{ template "chart.deprecationWarning" . }}

{{ template "chart.badgesSection" . }}

{{ template "chart.description" . }}

{{ template "chart.homepageLine" . }}

{{ template "chart.maintainersSection" . }}

{{ template "chart.sourcesSection" . }}

{{ template "chart.requirementsSection" . }}

{{ template "chart.valuesSectionMd" . }}

{{- if not .SkipVersionFooter }}
{{ template "helm-docs.versionFooter" . }}
{{- end }}
"""

# helm-docs' comment grammar (pkg/helm/chart_info.go).
DESCRIPTION = re.compile(r"^\s*#\s*(.*)\s+--\s*(.*)$")
CONTINUATION = re.compile(r"^\s*#(\s?)(.*)$")
DEFAULT = re.compile(r"^\s*# @default -- (.*)$")
VALUE_TYPE = re.compile(r"^\((.*?)\)\s*(.*)$", re.DOTALL)
UNSUPPORTED = re.compile(r"^\s*#\s*@(section|raw|notationType|ignore)\b")

STR, INT, FLOAT, BOOL, NULL, TIMESTAMP = (f"tag:yaml.org,2002:{t}" for t in
                                          ("str", "int", "float", "bool", "null", "timestamp"))


class ChartDocsError(Exception):
    """The chart uses something this generator does not implement; the message is one line."""


@dataclass
class Row:
    key: str
    type: str
    default: str
    auto_default: str
    description: str


# ---------------------------------------------------------------------------------------------------------------
# values.yaml -> rows
# ---------------------------------------------------------------------------------------------------------------

def _head_comment(lines: list[str], line_no: int) -> list[str]:
    """The comment lines right above line_no (0-based), stripped of indentation: yaml.v3's head comment."""
    out: list[str] = []
    i = line_no - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        out.insert(0, lines[i].strip())
        i -= 1
    return out


def _parse_comment(comment: list[str]) -> tuple[str, str, str, str]:
    """helm-docs' ParseComment: (key named in the comment, description, @default, type)."""
    last = max((i for i, line in enumerate(comment) if line.startswith("# --")), default=0)
    comment = comment[last:]
    key = description = default = value_type = ""
    start = None
    for i, line in enumerate(comment):
        match = DESCRIPTION.match(line)
        if match:
            key, description, start = match.group(1), match.group(2), i
            break
    if start is None:
        return "", "", "", ""
    typed = VALUE_TYPE.match(description)
    if typed and typed.group(1):
        value_type, description = typed.group(1), typed.group(2)
    for line in comment[start + 1:]:
        if UNSUPPORTED.match(line):
            raise ChartDocsError(f"{line.strip()!r}: not supported by build/chart_docs.py")
        if match := DEFAULT.match(line):
            default = match.group(1)
        elif match := CONTINUATION.match(line):
            description += " " + match.group(2)
    return key, description, default, value_type


def _auto_description(lines: list[str], key_node: yaml.Node | None) -> tuple[str, str, str]:
    """(description, @default, type) from the `# --` comment right above a key; empty when there is none."""
    if key_node is None:
        return "", "", ""
    comment = _head_comment(lines, key_node.start_mark.line)
    if not any("# --" in line for line in comment):
        return "", "", ""
    key, description, default, value_type = _parse_comment(comment)
    if key:
        raise ChartDocsError(f"values.yaml line {key_node.start_mark.line + 1}: '# {key} -- ...' comments naming a key "
                             "are not supported by build/chart_docs.py; put '# -- ...' right above the key")
    return description, default, value_type


def _go_float(value: float) -> str:
    """A float64 as Go's encoding/json writes it."""
    if math.isinf(value) or math.isnan(value):
        raise ChartDocsError(f"{value}: JSON has no such number")
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text and 1e-6 <= abs(value) < 1e21:
        mantissa, exponent = text.split("e")
        digits = mantissa.replace(".", "").lstrip("-")
        point = (mantissa.lstrip("-").index(".") if "." in mantissa else len(mantissa.lstrip("-"))) + int(exponent)
        sign = "-" if value < 0 else ""
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        return f"{sign}{digits[:point]}{'0' * (point - len(digits))}" + (f".{digits[point:]}" if point < len(digits)
                                                                          else "")
    if "e" in text:  # Go writes 1e+21, 1e-07: a two-digit exponent at least
        mantissa, exponent = text.split("e")
        sign, digits = exponent[0] if exponent[0] in "+-" else "+", exponent.lstrip("+-")
        return f"{mantissa}e{sign}{digits.zfill(2)}"
    return text


def _jsonable(node: yaml.Node):
    """helm-docs' convertHelmValuesToJsonable: maps, lists and scalars as yaml.v3 decodes them."""
    if isinstance(node, yaml.MappingNode):
        return {k.value: _jsonable(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_jsonable(v) for v in node.value]
    return _scalar(node)


# YAML 1.2's core schema, which yaml.v3 (helm-docs' parser) follows for plain scalars; PyYAML follows YAML 1.1.
CORE_SCHEMA = [
    (NULL, re.compile(r"~|null|Null|NULL|")),
    (BOOL, re.compile(r"true|True|TRUE|false|False|FALSE")),
    (INT, re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")),
    (FLOAT, re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")),
]


def _scalar(node: yaml.ScalarNode):
    """A scalar as yaml.v3 decodes it; refuses plain scalars that YAML 1.1 (PyYAML) and 1.2 read differently."""
    if node.style is None:
        core = next((tag for tag, pattern in CORE_SCHEMA if pattern.fullmatch(node.value)), STR)
        if core != node.tag and not (node.tag == TIMESTAMP and core == STR):
            raise ChartDocsError(f"values.yaml line {node.start_mark.line + 1}: {node.value!r} reads as {core} in "
                                 f"YAML 1.2 but {node.tag} in YAML 1.1: quote it")
    if node.tag == NULL:
        return None
    if node.tag in (STR, TIMESTAMP):
        return node.value
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def _to_json(value) -> str:
    """Go's json.Marshal with SetEscapeHTML(false): map keys sorted, no spaces, floats Go's way."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_to_json(str(k))}:{_to_json(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_to_json(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _type_name(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float):
        return "float"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return ""


def _row(key: str, value, described: tuple[str, str, str], node_tag: str | None = None) -> Row:
    description, auto_default, value_type = described
    if value is None and node_tag == NULL:
        return Row(key, value_type or "string", "" if auto_default else "`nil`", auto_default, description)
    default = "" if auto_default else f"`{_to_json(value)}`"
    return Row(key, value_type or _type_name(value), default, auto_default, description)


def _key_prefix(prefix: str, key: str) -> str:
    escaped = f'"{key}"' if "." in key or " " in key else key
    return f"{prefix}.{escaped}" if prefix else escaped


def _rows(lines: list[str], prefix: str, key: yaml.Node | None, node: yaml.Node, leaves: bool,
          owner_line: int = -1) -> list[Row]:
    """helm-docs' createValueRowsFromField: rows for node and, unless a description covered it, its leaves.
    key is the node whose head comment describes node (its key, or the item itself in a list); a key on the line
    of the key or item that holds its map or list (flow style, `- name: x`) has none: that comment is the holder's."""
    if key is not None and key.start_mark.line == owner_line:
        key = None
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        described = _auto_description(lines, key)
        line = key.start_mark.line if key is not None else owner_line
        is_map = isinstance(node, yaml.MappingNode)
        if not node.value:
            if is_map and prefix == "":
                return []
            if not (leaves or described[0]):
                return []
            return [_row(prefix, {} if is_map else [], described)]
        rows = []
        if described[0]:
            rows.append(_row(prefix, _jsonable(node), described))
            leaves = False
        if is_map:
            for k, v in node.value:
                rows += _rows(lines, _key_prefix(prefix, k.value), k, v, leaves, line)
        else:
            for i, item in enumerate(node.value):
                rows += _rows(lines, f"{prefix}[{i}]", item, item, leaves, line)
        return rows
    described = _auto_description(lines, key)
    if not (leaves or described[0]):
        return []
    return [_row(prefix, _scalar(node), described, node.tag)]


def value_rows(values_text: str) -> list[Row]:
    """The values table's rows for a values.yaml, sorted by key as helm-docs' default (alphanum) order."""
    lines = values_text.replace("\r\n", "\n").split("\n")
    for number, line in enumerate(lines, 1):
        if UNSUPPORTED.match(line):
            raise ChartDocsError(f"values.yaml line {number}: {line.strip()!r} is not supported by build/chart_docs.py")
    if "*" in values_text and any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(values_text,
                                                                                     Loader=yaml.SafeLoader)):
        raise ChartDocsError("values.yaml: YAML aliases are not supported by build/chart_docs.py")
    root = yaml.compose(values_text, Loader=yaml.SafeLoader)
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ChartDocsError("values.yaml must be a map")
    rows = sorted(_rows(lines, "", None, root, True), key=lambda row: row.key.encode())
    keys = {row.key for row in rows}
    for number, line in enumerate(lines, 1):  # helm-docs' scan for `# key -- description` comments
        match = DESCRIPTION.match(line)
        if match and match.group(1) in keys:
            raise ChartDocsError(f"values.yaml line {number}: '# {match.group(1)} -- ...' comments naming a key are "
                                 "not supported by build/chart_docs.py")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# helm-docs' built-in templates (pkg/document/template.go)
# ---------------------------------------------------------------------------------------------------------------

def _badge(label: str, value: str) -> str:
    return (f"![{label}: {value}](https://img.shields.io/badge/{label}-{value.replace('-', '--')}"
            f"-informational?style=%s) ") % BADGE_STYLE


def builtin_templates(chart: dict, rows: list[Row], helm_docs_version: str = "") -> dict[str, str]:
    name, version, app_version = chart.get("name", ""), str(chart.get("version", "")), chart.get("appVersion") or ""
    chart_type, description, home = chart.get("type") or "", chart.get("description") or "", chart.get("home") or ""
    kube_version, sources = chart.get("kubeVersion") or "", chart.get("sources") or []
    maintainers, dependencies = chart.get("maintainers") or [], chart.get("dependencies") or []
    app_version = str(app_version)

    version_badge = _badge("Version", version)
    type_badge = (f"![Type: {chart_type}](https://img.shields.io/badge/Type-{chart_type}-informational?style="
                  f"{BADGE_STYLE}) ") if chart_type else ""
    app_version_badge = _badge("AppVersion", app_version) if app_version else ""
    maintainers_table = "| Name | Email | URL |\n| ---- | ------ | --- |" + "".join(
        f"\n| {m.get('name', '')} | {'<' + m['email'] + '>' if m.get('email') else ''} | "
        f"{'<' + m['url'] + '>' if m.get('url') else ''} |" for m in maintainers)
    dependencies = sorted(dependencies, key=lambda d: f"{d.get('repository', '')}/{d.get('name', '')}")
    requirements_table = "| Repository | Name | Version |\n|------------|------|---------|" + "".join(
        f"\n| {d.get('repository', '')} | {d['alias'] + '(' + d['name'] + ')' if d.get('alias') else d['name']} | "
        f"{d.get('version', '')} |" for d in dependencies)
    kube_version_line = f"Kubernetes: `{kube_version}`" if kube_version else ""
    requirements = ""
    if dependencies or kube_version:
        requirements = "## Requirements\n\n"
        if kube_version:
            requirements += kube_version_line + "\n\n"
        if dependencies:
            requirements += requirements_table
    values_table = "| Key | Type | Default | Description |\n|-----|------|---------|-------------|" + "".join(
        f"\n| {r.key} | {r.type} | {r.default or r.auto_default} | {r.description} |" for r in rows)
    values_section = f"## Values\n\n{values_table}" if rows else ""
    footer = ("\n----------------------------------------------\nAutogenerated from chart metadata using "
              f"[helm-docs v{helm_docs_version}](https://github.com/norwoodj/helm-docs/releases/v{helm_docs_version})"
              if helm_docs_version else "")
    return {
        "chart.name": name,
        "chart.header": f"# {name}\n",
        "chart.deprecationWarning": "> **:exclamation: This Helm Chart is deprecated!**" if chart.get("deprecated")
        else "",
        "chart.version": version,
        "chart.versionBadge": version_badge,
        "chart.type": chart_type,
        "chart.typeBadge": type_badge,
        "chart.appVersion": app_version,
        "chart.appVersionBadge": app_version_badge,
        "chart.badgesSection": version_badge + type_badge + app_version_badge,
        "chart.description": description,
        "chart.homepage": home,
        "chart.homepageLine": f"**Homepage:** <{home}>" if home else "",
        "chart.maintainersHeader": "## Maintainers",
        "chart.maintainersTable": maintainers_table,
        "chart.maintainersSection": f"## Maintainers\n\n{maintainers_table}" if maintainers else "",
        "chart.sourcesHeader": "## Source Code",
        "chart.sourcesList": "".join(f"\n* <{s}>" for s in sources),
        "chart.sourcesSection": "## Source Code\n" + "".join(f"\n* <{s}>" for s in sources) if sources else "",
        "chart.requirementsHeader": "## Requirements",
        "chart.kubeVersion": kube_version,
        "chart.kubeVersionLine": kube_version_line,
        "chart.requirementsTable": requirements_table,
        "chart.requirementsSection": requirements,
        "chart.valuesHeader": "## Values",
        "chart.valuesTable": values_table,
        "chart.valuesTableMd": values_table,
        "chart.valuesSection": values_section,
        "chart.valuesSectionMd": values_section,
        "helm-docs.version": helm_docs_version,
        "helm-docs.versionFooter": footer,
    }


# ---------------------------------------------------------------------------------------------------------------
# README.md.gotmpl -> README.md
# ---------------------------------------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
TEMPLATE_CALL = re.compile(r'template\s+"([^"]+)"\s+\.')
FOOTER_BLOCK = re.compile(r"if not \.SkipVersionFooter|end")


def render(template: str, templates: dict[str, str], skip_version_footer: bool = False) -> str:
    """Go text/template semantics for `{{ template "x" . }}`, `{{/* */}}` and trim markers; the
    default template's version-footer `if` block too."""
    out: list[str] = []
    pos, skipping = 0, False
    trim_next = False
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        if not skipping:
            out.append(text)
        body = match.group(2).strip()
        trim_next = bool(match.group(3))
        pos = match.end()
        if body.startswith("/*") and body.endswith("*/"):
            continue
        if FOOTER_BLOCK.fullmatch(body):
            skipping = body != "end" and skip_version_footer
            if body == "end":
                skipping = False
            continue
        call = TEMPLATE_CALL.fullmatch(body)
        if not call:
            raise ChartDocsError(f"{{{{ {body} }}}}: only {{{{ template \"<name>\" . }}}} actions are supported")
        if call.group(1) not in templates:
            raise ChartDocsError(f"{{{{ {body} }}}}: no template {call.group(1)!r}")
        if not skipping:
            out.append(templates[call.group(1)])
    text = template[pos:]
    out.append(text.lstrip(" \t\r\n") if trim_next else text)
    return markdown_clean_up("".join(out))


def markdown_clean_up(text: str) -> str:
    """helm-docs' applyMarkDownFormat."""
    return re.sub(r"\n{3,}", "\n\n", re.sub(r" \n", "\n", text))


def generate(chart_dir: Path, helm_docs_version: str = "") -> str:
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    requirements = chart_dir / "requirements.yaml"  # where apiVersion v1 charts list their dependencies
    if chart.get("apiVersion") == "v1" and requirements.exists():
        chart["dependencies"] = (yaml.safe_load(requirements.read_text()) or {}).get("dependencies") or []
    values_path = chart_dir / "values.yaml"
    rows = value_rows(values_path.read_text()) if values_path.exists() else []
    gotmpl = chart_dir / "README.md.gotmpl"
    template = gotmpl.read_text() if gotmpl.exists() else DEFAULT_TEMPLATE
    return render(template, builtin_templates(chart, rows, helm_docs_version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what would be written")
    args = parser.parse_args(argv)
    try:
        text = generate(args.chart_dir)
    except (ChartDocsError, OSError, yaml.YAMLError) as err:
        print(f"chart_docs: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    readme = args.chart_dir / "README.md"
    if args.check:
        if not readme.exists() or readme.read_text() != text:
            print(f"chart_docs: {readme} is out of date: run `make chart-docs`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    print(f"chart_docs: wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

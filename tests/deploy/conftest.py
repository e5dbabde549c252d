"""Shared loaders for the deploy/ checks: files, YAML documents, kustomize output, metric names.

Everything here reads files in the repository; nothing touches the network.
``kubectl kustomize`` is used when kubectl is installed (it is on the
project's machines); tests that need it skip without it.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
DASHBOARD = DEPLOY / "grafana" / "tidegate-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

#: Oldest Kubernetes the manifests support (native sidecars and the preStop
#: sleep action are on by default from 1.30), checked with the newest schemas
#: kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "latest")

#: Kinds validated with our own minimal JSON schema (CRDs have no upstream
#: schema in kubernetes-validate).
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}


def yaml_files(directory: Path = DEPLOY) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    """YAML files that kustomizations list as resources (Kubernetes objects)."""
    found: list[Path] = []
    for directory in kustomization_dirs():
        kustomization = load_documents(directory / "kustomization.yaml")[0]
        for resource in kustomization.get("resources", []):
            path = (directory / resource).resolve()
            if path.is_file():
                found.append(path)
    return sorted(set(found))


def tool(name: str) -> str | None:
    """An executable from this virtualenv (CI runs .venv/bin/python without it on PATH), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


@functools.cache
def kubectl() -> str | None:
    """Path of a kubectl whose built-in kustomize works offline, or None."""
    path = shutil.which("kubectl")
    if path is None:
        return None
    try:
        subprocess.run([path, "version", "--client"], capture_output=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return path


@functools.cache
def _kustomize_output(directory: Path) -> str:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    result = subprocess.run(
        [binary, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}")
    return result.stdout


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` renders (skips without kubectl)."""
    return [doc for doc in yaml.safe_load_all(_kustomize_output(directory)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        o for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


# ---------------------------------------------------------------- PromQL

_GRAFANA_RANGES = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def grafana_variables(expr: str) -> set[str]:
    """Names of dashboard variables an expression uses (built-ins like $__range excluded)."""
    return {name for name in _VARIABLE.findall(expr) if not name.startswith("__")}


def promql_for_parsing(expr: str) -> str:
    """Make a Grafana query plain PromQL: ranges become 5m, numeric variables 1.

    Variables inside label-matcher strings (job=~"$job") are left alone: they
    are strings to PromQL.
    """
    expr = _GRAFANA_RANGES.sub("5m", expr)
    pieces = []
    last = 0
    for match in _STRING.finditer(expr):
        pieces.append(_VARIABLE.sub("1", expr[last:match.start()]))
        pieces.append(match.group(0))
        last = match.end()
    pieces.append(_VARIABLE.sub("1", expr[last:]))
    return "".join(pieces)


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(metric name, {label: value of = and =~ matchers}) for every vector selector in expr."""
    import promql_parser

    tree = promql_parser.parse(promql_for_parsing(expr))
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {}
            name = node.name
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    name = matcher.value
                else:
                    labels[matcher.name] = matcher.value
            found.append((name or "", labels))
        return True

    promql_parser.walk(tree, visit)
    return iter(found)


_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@functools.cache
def exported_metrics() -> dict[str, str]:
    """Metric family name → type, as ``proxy.metrics.Metrics().render()`` exposes them."""
    from proxy.backends import Endpoint
    from proxy.classify import Classifier
    from proxy.config import BackpressureConfig, RoutingConfig
    from proxy.metrics import Metrics
    from proxy.router import Router

    metrics = Metrics()
    # The routing families are collected from the router at scrape time, as a sidecar does.
    metrics.watch_routing(Router(RoutingConfig(), BackpressureConfig(), [Endpoint("primary", "127.0.0.1", 3306)],
                                 classifier=Classifier()))
    body, _ = metrics.render()
    families: dict[str, str] = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families[name] = kind
    return families


def exported_series_names() -> set[str]:
    """Every series name a scrape can contain: counters' _total, histograms' _bucket/_sum/_count."""
    names: set[str] = set()
    for family, kind in exported_metrics().items():
        names.add(family)
        if kind == "histogram":
            names.update(family + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return names


def reported_name(series: str) -> str:
    """The name to report for a series that is not exported: histogram suffixes stripped."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series

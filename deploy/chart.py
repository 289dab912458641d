"""The Helm chart rendered by a real Helm engine (the Helm SDK that helm-python-sdk bundles):
what `helm install` would send, as Python objects. Used by the chart's tests, the podman play
of its pods and `make k8s-test`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "helm" / "ssd300"


def load_chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None, release: str = "demo",
           namespace: str = "ssd300") -> list[dict]:  # fmt: skip
    """Every object the chart renders with ``values``, after the chart's values.schema.json
    accepted them (HelmValuesError otherwise), as `helm install` does."""
    chart = load_chart()
    try:
        chart.validate_schema(values or {})
        out = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()
    objects = []
    for path in sorted(out):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects += [doc for doc in yaml.safe_load_all(out[path]) if doc]
    return objects


def by_kind(objects: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (
            component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    (found,) = by_kind(objects, kind, component)
    return found

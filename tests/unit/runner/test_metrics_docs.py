"""docs/metrics.md and the sample Grafana dashboard name only metrics the runner exposes, and
the document lists every metric of ours."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState

DOCS = Path(__file__).resolve().parents[3] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:bigtent|process)_[a-z0-9_]+")


_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def exposed_names(body: str) -> set[str]:
    """Every name a query may use for the families of an exposition: the family's own, and
    its sample names (``x_total``; a histogram's ``_bucket``, ``_sum`` and ``_count``), also
    for a family that has no series yet (listed by its HELP and TYPE lines)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def full_exposition() -> str:
    """A registry in which every labelled metric has a series."""
    m = Metrics()
    node = StepNode(1, "/nix/store/x.drv", Requirement("x86_64-linux", frozenset()),
                    StepState.WAITING, 0.0)  # fmt: skip
    m.watch_steps(lambda: [node])
    m.system("x86_64-linux")
    m.autoscaler_pools(["pool"])
    return m.render()[0].decode()


def dashboard_metric_names(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def test_dashboard_is_valid_json_whose_panels_all_query() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC_NAME.search(target["expr"]), (panel["title"], target["expr"])


def test_every_metric_the_dashboard_uses_is_exposed() -> None:
    used = dashboard_metric_names(DASHBOARD.read_text())
    assert "bigtent_step_phase_seconds_bucket" in used
    missing = used - exposed_names(full_exposition())
    assert not missing, f"the dashboard uses metrics /metrics does not have: {sorted(missing)}"


def test_metrics_md_lists_every_bigtent_metric() -> None:
    text = (DOCS / "metrics.md").read_text()
    documented = set(re.findall(r"`(bigtent_[a-z0-9_]+)`", text))
    families = {
        f.name if f.type != "counter" else f.name + "_total"
        for f in text_string_to_metric_families(full_exposition())
        if f.name.startswith("bigtent_") and not f.name.endswith("_created")
    }
    assert families - documented == set(), "undocumented metrics"
    assert documented - families == set(), "documented metrics that do not exist"

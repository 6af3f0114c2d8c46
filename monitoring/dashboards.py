"""Dashboards as code: the workspace project's panels, rebuilt from this file on every run.

Every panel is a line over time, one point per monitored day (one snapshot per day). The code
is the source of truth: ``apply_dashboard`` clears the project's dashboard and re-adds these
panels, so a change here shows up at the next ``hap monitor`` (or ``hap dashboard``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.config import Config

TAB_OVERVIEW = "Hard fraction"
TAB_CONTENT = "Per content type"
TAB_DRIFT = "Drift and CTR"


def _mean(column: str, legend: str) -> Any:
    from evidently.sdk.models import PanelMetric

    return PanelMetric(legend=legend, metric="MeanValue", metric_labels={"column": column})


def _line(title: str, size: str, description: str, *values: Any) -> Any:
    """A line over the monitored days, one line per value."""
    from evidently.sdk.panels import line_plot_panel

    return line_plot_panel(title=title, size=size, description=description, values=list(values))


def _per_content_type(cfg: Config, column: str, title: str, description: str) -> Any:
    """One line per content type of the ``{column}_ct{k}`` columns."""
    types = range(cfg.contract.n_content_types)
    return _line(title, "half", description, *[_mean(f"{column}_ct{k}", f"type {k}") for k in types])


def panels(cfg: Config) -> list[tuple[str, Any]]:
    """(tab, panel) pairs of the project dashboard."""
    from evidently.sdk.models import PanelMetric

    mon = cfg.monitor
    hard_why = (
        "data-side: hard sources among logged negatives; model-side: negatives within "
        f"{mon.margin} of their request's positive (champion light score)"
    )
    drifted = PanelMetric(
        legend="drifted share", metric="DriftedColumnsCount", metric_labels={"value_type": "share"}
    )
    score_drift = PanelMetric(
        legend="light score drift", metric="ValueDrift", metric_labels={"column": "light_score"}
    )
    return [
        (
            TAB_OVERVIEW,
            _line(
                "Hard-sample fraction",
                "full",
                hard_why,
                _mean("hard_neg", "data-side (hard sources)"),
                _mean("near_margin", "model-side (near margin)"),
            ),
        ),
        (
            TAB_OVERVIEW,
            _line(
                "Routed share",
                "half",
                "full-flow candidates above the champion's calibrated routing threshold",
                _mean("routed", "routed to the expressive model"),
            ),
        ),
        (
            TAB_OVERVIEW,
            _line(
                "Champion version",
                "half",
                "registry version that scored the day",
                _mean("champion_version", "champion"),
            ),
        ),
        (
            TAB_CONTENT,
            _per_content_type(
                cfg, "hard_neg", "Hard fraction (data-side) by content type", "hard sources among negatives"
            ),
        ),
        (
            TAB_CONTENT,
            _per_content_type(
                cfg,
                "near_margin",
                "Hard fraction (model-side) by content type",
                "negatives near the positive",
            ),
        ),
        (
            TAB_CONTENT,
            _per_content_type(
                cfg, "routed", "Routed share by content type", "candidates above the routing threshold"
            ),
        ),
        (
            TAB_CONTENT,
            _per_content_type(
                cfg, "exposed", "Content mix of exposures", "share of exposures by content type"
            ),
        ),
        (
            TAB_DRIFT,
            _line(
                "Feature drift share",
                "half",
                f"share of features drifted ({mon.drift_method}, threshold {mon.drift_threshold})",
                drifted,
            ),
        ),
        (
            TAB_DRIFT,
            _line(
                "Prediction drift (light score)",
                "half",
                f"{mon.drift_method} score of the champion's light scores",
                score_drift,
            ),
        ),
        (TAB_DRIFT, _line("CTR", "half", "clicks per exposure", _mean("ctr", "CTR"))),
    ]


def apply_dashboard(project: Any, cfg: Config) -> None:
    project.dashboard.clear_dashboard()
    for tab, panel in panels(cfg):
        project.dashboard.add_panel(panel, tab=tab)


def open_project(cfg: Config) -> tuple[Any, Any]:
    """The workspace and its monitoring project, created with its dashboard on first use."""
    from evidently.ui.workspace import Workspace

    path = layout.monitoring_workspace(cfg)
    path.mkdir(parents=True, exist_ok=True)
    ws = Workspace.create(str(path))
    found = ws.search_project(cfg.monitor.project)
    if found:
        return ws, found[0]
    project = ws.create_project(
        cfg.monitor.project, description="HAP pre-ranker: hard-sample fraction, drift, CTR"
    )
    apply_dashboard(project, cfg)
    return ws, project


def refresh(cfg: Config) -> tuple[Any, Any]:
    """Open the project and rewrite its dashboard from this file."""
    ws, project = open_project(cfg)
    apply_dashboard(project, cfg)
    return ws, project


def mean_series(cfg: Config, column: str) -> dict[str, float]:
    """What a ``MeanValue`` line panel plots for ``column``: {day: value}, read from the workspace."""
    ws, project = open_project(cfg)
    out: dict[str, float] = {}
    for sid in ws.list_runs(project.id):
        run = ws.get_run(project.id, sid)
        if run is None:
            continue
        for result in run.metric_results.values():
            params = result.metric_value_location.metric.params
            if params.get("type", "").endswith(":MeanValue") and params.get("column") == column:
                out[run.metadata.get("hap_date", str(run.timestamp))] = float(result.value)
    return dict(sorted(out.items()))


def ui_command(cfg: Config, port: int | None = None) -> list[str]:
    exe = Path(sys.executable).with_name("evidently")
    return [
        str(exe) if exe.exists() else "evidently",
        "ui",
        "--workspace",
        str(layout.monitoring_workspace(cfg)),
        "--host",
        "127.0.0.1",
        "--port",
        str(port or cfg.monitor.ui_port),
    ]


def project_url(cfg: Config, project: Any, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or cfg.monitor.ui_port}/projects/{project.id}"


def serve(cfg: Config, port: int | None = None) -> int:
    """Run ``evidently ui`` on the workspace in the foreground, supervised: Ctrl-C or SIGTERM stops
    it and every process it started (``hap.core.procs.run_supervised``), none left re-parented."""
    from hap.core.procs import run_supervised

    _, project = refresh(cfg)
    print(f"dashboard: {project_url(cfg, project, port)}", flush=True)
    return run_supervised(ui_command(cfg, port))

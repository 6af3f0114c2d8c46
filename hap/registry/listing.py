"""``hap models``: every registered version of ``hap-prerank`` as a row, with its aliases,
data version, gate verdict and evaluation metrics (read from the registry alone)."""

from __future__ import annotations

from dataclasses import dataclass

from hap.core.config import Config
from hap.registry import tracking
from hap.registry.registration import (
    TAG_DATA_VERSION,
    TAG_DATE,
    TAG_VERDICT,
    metric_key,
    versions,
)


@dataclass(frozen=True)
class ModelRow:
    version: str
    aliases: list[str]
    date: str
    data_version: str
    verdict: str
    metrics: dict[str, float]
    run_id: str


def list_models(cfg: Config) -> list[ModelRow]:
    from mlflow.exceptions import MlflowException

    c = tracking.client(cfg)
    try:  # version search does not fill aliases on every store; the registered model does
        by_alias = c.get_registered_model(cfg.gate.model_name).aliases
    except MlflowException:
        return []
    rows = []
    for v in versions(cfg, c):
        run_metrics = c.get_run(v.run_id).data.metrics if v.run_id else {}
        aliases = sorted(a for a, ver in by_alias.items() if str(ver) == v.version)
        rows.append(
            ModelRow(
                v.version,
                aliases,
                v.tags.get(TAG_DATE, ""),
                v.tags.get(TAG_DATA_VERSION, ""),
                v.tags.get(TAG_VERDICT, "-"),
                {k[len("eval/") :]: val for k, val in run_metrics.items() if k.startswith("eval/")},
                v.run_id or "",
            )
        )
    return rows


def render_models(cfg: Config, rows: list[ModelRow]) -> str:
    if not rows:
        return f"no versions of '{cfg.gate.model_name}' registered yet"
    keys = [metric_key(cfg.evaluate.primary_metric), "gauc", metric_key(cfg.gate.cost_metric)]
    header = ["version", "aliases", "date", "data_version", "verdict", *keys]
    body = [
        [
            f"v{r.version}",
            ",".join(r.aliases) or "-",
            r.date,
            r.data_version[:12],
            r.verdict,
            *[(f"{r.metrics[k]:.4g}" if k in r.metrics else "-") for k in keys],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])

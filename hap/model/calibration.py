"""The served score as a click probability: Platt scaling fitted at training time, kept in the bundle.

The pre-ranker's order is what the ranking stage consumes (it takes the top
``contract.prerank_keep``), but its score is also meant as a probability: P(click | exposed),
so that a downstream stage may threshold it or mix it with other probabilities. The raw logits
are not one: under ``routing.merge: sum`` a routed candidate's score is the sum of two CTR logits
(a two-model ensemble, about twice the scale), and neither tower is trained with the true
exposure base rate (GHCL's contrastive losses and sampled negatives).

So each score kind the final order can serve gets its own Platt scaling ``sigmoid(a * s + b)``,
fitted by logistic regression (scikit-learn) on the exposures of the training set's validation
requests (``batches.is_validation_request``, held out from the weights), and saved in
``bundle.json`` next to the routing threshold:

- ``light``: the light logit (every unrouted candidate);
- ``expressive``: the expressive logit (routed candidates under ``stack`` / ``raw``, and every
  candidate under ``expressive_all``);
- ``sum``: light + expressive (routed candidates under ``sum``).

``served_probability`` is the one function that turns a DAMR result into the served probability;
serving, the pyfunc model and evaluation all call it through ``HapBundle.score_table``. Each
mapping is increasing, so the order within each routing segment is unchanged. A bundle without a
calibration (written before it existed, or trained without a training set on disk) serves
``sigmoid(logit)`` of the same score, which is what its log loss then measures.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import numpy as np

from hap.core import layout, schema

if TYPE_CHECKING:
    from hap.core.config import Config

KINDS = ("light", "expressive", "sum")
MIN_ROWS = 50  # fewer validation exposures (or no click among them): no calibration, sigmoid(logit)


def kind_masks(routed: np.ndarray, serve: str, merge: str) -> dict[str, np.ndarray]:
    """Which candidates' served score is which logit: ``light``, ``expressive`` or ``sum``."""
    routed = np.asarray(routed, bool)
    none = np.zeros_like(routed)
    if serve == "expressive_all":
        return {"light": none, "expressive": ~none, "sum": none}
    if serve == "light":
        return {"light": ~none, "expressive": none, "sum": none}
    routed_kind = "sum" if merge == "sum" else "expressive"
    return {"light": ~routed, "expressive": none, "sum": none} | {routed_kind: routed}


def served_logit(
    light: np.ndarray, expressive: np.ndarray, routed: np.ndarray, serve: str, merge: str
) -> np.ndarray:
    """The served score on its logit scale (what the order sorts by, without the routed offset)."""
    from hap.model.routing import merged_logit

    if serve == "expressive_all":
        return np.asarray(expressive, np.float64)
    return merged_logit(light, expressive, np.asarray(routed, bool) & (serve != "light"), merge)


def served_probability(
    light: np.ndarray,
    expressive: np.ndarray,
    routed: np.ndarray,
    serve: str,
    merge: str,
    calibration: dict[str, Any] | None,
) -> np.ndarray:
    """P(click | exposed) of each candidate's served score: its kind's Platt scaling, or
    ``sigmoid(logit)`` where the bundle has none."""
    logit = served_logit(light, expressive, routed, serve, merge)
    z = logit.copy()
    for kind, rows in kind_masks(routed, serve, merge).items():
        ab = (calibration or {}).get(kind)
        if ab is not None:
            z[rows] = ab[0] * logit[rows] + ab[1]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def platt(scores: np.ndarray, labels: np.ndarray) -> list[float] | None:
    """``[a, b]`` of ``sigmoid(a * s + b)`` by unpenalised logistic regression; None when the
    data cannot fit one (too few rows, one class only, non-finite scores)."""
    from sklearn.linear_model import LogisticRegression

    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(int)
    if len(s) < MIN_ROWS or y.min(initial=0) == y.max(initial=0) or not np.isfinite(s).all():
        return None
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(s[:, None], y)
    return [float(fit.coef_[0, 0]), float(fit.intercept_[0])]


def validation_exposures(cfg: Config, date: dt.date | str) -> Any:
    """The exposed rows (clicked or not) of the training set's validation requests, or None."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from hap.model.batches import is_validation_request

    path = layout.training_set(cfg, date)
    if not path.exists():
        return None
    exposed = [schema.Source.EXPOSE_POS.value, schema.Source.EXPOSE_NEG.value]
    table = ds.dataset(str(path), format="parquet").to_table(filter=ds.field("source").isin(exposed))
    if table.num_rows == 0:
        return None
    return table.filter(pa.array(is_validation_request(cfg, table["request_id"].to_numpy())))


def fit_calibration(bundle: Any, table: Any) -> dict[str, list[float] | None] | None:
    """Platt scaling of each score kind of ``bundle`` (a ``HapBundle``) on exposure rows."""
    if table is None or table.num_rows < MIN_ROWS:
        return None
    y = table["label"].to_numpy().astype(int)
    light = bundle.tower_scores("light", table) if bundle.light is not None else None
    expr = bundle.tower_scores("expressive", table) if bundle.expressive is not None else None
    out: dict[str, list[float] | None] = {"light": None, "expressive": None, "sum": None}
    if light is not None:
        out["light"] = platt(light, y)
    if expr is not None:
        out["expressive"] = platt(expr, y)
    if light is not None and expr is not None:
        out["sum"] = platt(light.astype(np.float64) + expr, y)
    return out

"""The promotion rule as a pure function over metric dicts, modelled on TFX's evaluator blessing.

Kept free of MLflow and torch so the rule itself is cheap to test and to read: a challenger is
blessed only when every metric the gate reads is present and finite, it clears the absolute
floors and the cost ceiling and, when a champion exists, its primary metric is at least the
champion's + ``min_gain`` (negative: a non-inferiority margin, so a fresher model of equal quality
replaces the champion) and it regresses no slice by more than ``max_slice_regression``. Both
were measured on the same eval set by the caller.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hap.core.config import GateConfig

Verdict = Literal["pass", "fail"]


@dataclass(frozen=True)
class Check:
    """One comparison the gate made; ``reason`` says why it failed (empty when it passed)."""

    name: str  # e.g. "floor:gauc", "gain:recall@50", "slice:auc_slice_hard", "cost"
    metric: str
    value: float | None
    threshold: float | None
    op: Literal[">=", "<="]
    passed: bool
    champion: float | None = None
    delta: float | None = None  # value - champion
    reason: str = ""


@dataclass
class Decision:
    verdict: Verdict
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def slice_metrics(metrics: dict[str, Any], prefixes: list[str]) -> list[str]:
    return sorted(m for m in metrics if any(m.startswith(p) for p in prefixes))


def required_metrics(
    gate: GateConfig, primary: str, champion: dict[str, Any] | None, challenger: dict[str, Any]
) -> list[str]:
    """Every metric the rule reads: primary, floors, cost and the slices of either model."""
    names = {primary, gate.cost_metric, *gate.floors}
    names.update(slice_metrics(challenger, gate.slice_prefixes))
    if champion:
        names.update(slice_metrics(champion, gate.slice_prefixes))
    return sorted(names)


def decide(
    challenger: dict[str, Any], champion: dict[str, Any] | None, gate: GateConfig, primary: str
) -> Decision:
    """Bless or reject ``challenger`` against ``champion`` (None: no champion yet, floors only)."""
    checks: list[Check] = []
    reasons: list[str] = []

    def record(check: Check) -> None:
        checks.append(check)
        if not check.passed:
            reasons.append(check.reason)

    for name in required_metrics(gate, primary, champion, challenger):
        if not _finite(challenger.get(name)):
            got = "missing" if name not in challenger else f"not finite ({challenger.get(name)!r})"
            record(
                Check(
                    f"present:{name}",
                    name,
                    None,
                    None,
                    ">=",
                    False,
                    reason=f"metric '{name}' is {got}; a model with missing or NaN metrics is never promoted",
                )
            )

    def value(name: str) -> float | None:
        return float(challenger[name]) if _finite(challenger.get(name)) else None

    for name, floor in sorted(gate.floors.items()):
        v = value(name)
        if v is not None:
            ok = v >= floor
            record(
                Check(
                    f"floor:{name}",
                    name,
                    v,
                    floor,
                    ">=",
                    ok,
                    reason="" if ok else f"{name}={v:.4f} is below its floor {floor:.4f}",
                )
            )

    cost = value(gate.cost_metric)
    if cost is not None:
        ok = cost <= gate.max_flops_per_request
        record(
            Check(
                "cost",
                gate.cost_metric,
                cost,
                gate.max_flops_per_request,
                "<=",
                ok,
                reason=""
                if ok
                else f"{gate.cost_metric}={cost:.3g} exceeds the ceiling {gate.max_flops_per_request:.3g}",
            )
        )

    if champion:
        v, c = value(primary), champion.get(primary)
        if v is not None and _finite(c):
            c = float(c)
            need = c + gate.min_gain
            ok = v >= need
            record(
                Check(
                    f"gain:{primary}",
                    primary,
                    v,
                    need,
                    ">=",
                    ok,
                    champion=c,
                    delta=v - c,
                    reason=""
                    if ok
                    else f"{primary}={v:.4f} does not beat the champion's {c:.4f} "
                    f"by min_gain {gate.min_gain:g} (delta {v - c:+.4f})",
                )
            )
        elif v is not None:
            record(
                Check(
                    f"gain:{primary}",
                    primary,
                    v,
                    None,
                    ">=",
                    False,
                    champion=None,
                    reason=f"the champion's {primary} is missing or NaN on this eval set; "
                    "cannot compare, so not promoting",
                )
            )
        for name in slice_metrics(challenger, gate.slice_prefixes):
            v, c = value(name), champion.get(name)
            if v is None or not _finite(c):
                continue  # missing on the challenger is already a failure; on the champion: no baseline
            c = float(c)
            need = c - gate.max_slice_regression
            ok = v >= need
            record(
                Check(
                    f"slice:{name}",
                    name,
                    v,
                    need,
                    ">=",
                    ok,
                    champion=c,
                    delta=v - c,
                    reason=""
                    if ok
                    else f"slice {name} regressed {v - c:+.4f} vs the champion "
                    f"(max {gate.max_slice_regression:g})",
                )
            )

    return Decision("pass" if not reasons else "fail", reasons, checks)

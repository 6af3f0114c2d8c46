"""The promotion rule as a pure function over metrics and paired intervals (TFX-style blessing).

Kept free of MLflow and torch so the rule itself is cheap to test and to read. A challenger is
blessed only when:
- every metric the gate reads is present and finite, it clears the absolute floors and the cost
  ceiling, and its own training set is healthy (row count against the trailing training sets,
  no non-finite feature values);
- when a champion exists: non-inferiority on the primary metric. The lower bound of the paired
  bootstrap interval of (challenger - champion) over the same eval requests must be above
  ``-margin``, so a fresher model of equal quality replaces the champion, and one worse by more
  than the eval noise plus the margin does not. A missing or NaN interval never promotes.
- the primary metric's check decides only when its interval is narrow enough to tell an equal
  challenger from one worse by the margin: half-width at most ``primary_decisive_ratio`` x
  ``margin``. A wider interval whose lower bound is at or below ``-margin`` (and whose upper bound is
  above it: a model clearly worse by more than the margin always fails) makes the verdict
  ``undecided``, never ``fail``; ``on_undecided`` is the explicit policy then: ``keep`` the
  champion, keep it and raise an ``alert``, or ``promote_if_better`` (the point estimate is not
  below the champion's and every other check holds).
- each slice is judged the same way with ``max_slice_regression`` as its margin, but only a
  *decisive* slice can block: one whose interval's half-width is at most
  ``slice_decisive_ratio`` x its margin. A wider interval cannot tell an equal challenger from
  one worse by the whole margin (at half-width = margin an equal model fails about half the
  time), so it is recorded as ``not_decisive`` and does not block. The slices are one family:
  their intervals are taken at the Bonferroni-adjusted level ``1 - (1 - confidence) / m``
  (``slice_adjust``; ``interval_levels``), so that over all m slices an equal challenger is
  blocked with probability at most (1 - confidence) / 2, and a decisive slice that lost its whole
  margin is still caught with probability at least 1 - (1 - confidence) / (2m).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hap.core.config import GateConfig

Verdict = Literal["pass", "fail", "undecided"]


@dataclass(frozen=True)
class Check:
    """One comparison the gate made; ``reason`` says why it failed (empty when it passed)."""

    name: str  # e.g. "floor:gauc", "gain:recall@50", "slice:auc_slice_hard", "cost"
    metric: str
    value: float | None
    threshold: float | None
    op: Literal[">=", "<=", ">"]
    passed: bool  # False: the check blocks the promotion (a not-decisive check never does)
    champion: float | None = None
    delta: float | None = None  # value - champion
    reason: str = ""
    lower: float | None = None  # paired interval of value - champion
    upper: float | None = None
    n: int | None = None  # eval requests the interval is over
    confidence: float | None = None  # the interval's level (slices: adjusted for the family)
    halfwidth: float | None = None  # (upper - lower) / 2
    decisive: bool | None = None  # half-width small enough against the margin for the check to block
    verdict: CheckVerdict = "pass"  # pass | fail | not_decisive (failed, but cannot tell: not blocking)


CheckVerdict = Literal["pass", "fail", "not_decisive"]


@dataclass(frozen=True)
class Interval:
    """A paired bootstrap interval of (challenger - champion) over ``n`` eval requests."""

    diff: float
    lower: float
    upper: float
    n: int
    confidence: float | None = None

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.diff, self.lower, self.upper)) and self.n >= 2

    @property
    def halfwidth(self) -> float:
        return (self.upper - self.lower) / 2.0


@dataclass(frozen=True)
class TrainingHealth:
    """The challenger's own training set, against the trailing days' training sets."""

    rows: int
    trailing_rows: list[int]
    nonfinite_values: int


@dataclass
class Decision:
    """The rule's verdict, why, and whether the challenger is promoted: a pass always is, a fail
    never is, and an undecided comparison is promoted only under ``promote_if_better``."""

    verdict: Verdict
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    promote: bool = False
    undecided: str = ""  # why the primary metric could not decide, and the policy's outcome
    alert: bool = False  # the policy asks the on-call engineer to look (on_undecided: alert)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "promote": self.promote,
            "undecided": self.undecided,
            "alert": self.alert,
            "checks": [asdict(c) for c in self.checks],
        }


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
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    gate: GateConfig,
    primary: str,
    intervals: dict[str, Interval] | None = None,
    health: TrainingHealth | None = None,
) -> Decision:
    """Bless or reject ``challenger`` against ``champion`` (None: no champion yet, floors only);
    ``intervals`` holds the paired intervals of the primary metric and the slices."""
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

    if champion is not None:
        for check in comparison_checks(challenger, champion, gate, primary, intervals or {}):
            record(check)
    for check in health_checks(health, gate) if health is not None else []:
        record(check)

    if reasons:
        return Decision("fail", reasons, checks)
    gain = next((c for c in checks if c.name == f"gain:{primary}"), None)
    if gain is not None and gain.verdict == "not_decisive":
        need = gate.primary_decisive_ratio * gate.margin
        why = (
            f"undecided: {gain.metric} interval ±{gain.halfwidth:.4f} is wider than ±{need:.4f} "
            f"({gate.primary_decisive_ratio:g} x the margin {gate.margin:g}): challenger - champion "
            f"{gain.delta:+.4f} [{gain.lower:+.4f}, {gain.upper:+.4f}] over {gain.n} requests"
        )
        return undecided_decision(why, gain.delta or 0.0, gate, checks)
    blind = _blind_to_order(challenger, primary)
    if gain is not None and blind:
        return undecided_decision(blind, gain.delta or 0.0, gate, checks)
    return Decision("pass", reasons, checks, promote=True)


def _blind_to_order(challenger: dict[str, Any], primary: str) -> str:
    """Why ``primary`` cannot rank models on this eval set, or "": a metric on which a random
    order scores exactly what the model scores (say recall@K with K at least every request's
    candidate count) passes any challenger, so it must not be read as a verdict."""
    model, random = challenger.get(primary), challenger.get(f"ref_random_{primary}")
    if not (_finite(model) and _finite(random)) or abs(float(model) - float(random)) > 1e-12:
        return ""
    return (
        f"undecided: {primary} cannot tell the model from a random order on this eval set (both "
        f"{float(model):.4f}): its K is not below the candidates per request; choose a smaller K "
        "(evaluate.primary_metric / evaluate.fallback_metric)"
    )


def undecided_decision(why: str, delta: float, gate: GateConfig, checks: list[Check]) -> Decision:
    """Every other check holds but the primary metric cannot decide (``why``): apply
    ``gate.on_undecided``; ``delta`` is its point estimate of challenger - champion."""
    policy = gate.on_undecided
    promote = policy == "promote_if_better" and delta >= 0.0
    if policy == "promote_if_better":
        outcome = (
            "promoted: its point estimate is not below the champion's and every other check holds"
            if promote
            else "champion kept: its point estimate is below the champion's"
        )
    else:
        outcome = "champion kept" + (", alert raised" if policy == "alert" else "")
    return Decision(
        "undecided",
        [],
        checks,
        promote=promote,
        undecided=f"{why}; policy {policy}: {outcome}",
        alert=policy == "alert",
    )


def non_inferior(
    name: str,
    metric: str,
    interval: Interval | None,
    margin: float,
    values: tuple[Any, Any],
    decisive_ratio: float | None = None,
) -> Check:
    """Pass when the interval's lower bound of (challenger - champion) is above ``-margin``.

    With ``decisive_ratio``, a check whose interval's half-width exceeds ``decisive_ratio x
    margin`` cannot tell an equal challenger from a regressed one: when its lower bound is not
    above ``-margin`` (and its upper bound is, or the challenger is clearly worse) it is
    ``not_decisive`` instead of failed. A missing or NaN interval always blocks."""
    v, c = (float(x) if _finite(x) else None for x in values)
    if interval is None or not interval.finite:
        return Check(
            name,
            metric,
            v,
            -margin,
            ">",
            False,
            champion=c,
            reason=f"no paired interval for {metric} (missing or NaN on the challenger or the champion); "
            "cannot compare, so not promoting",
            verdict="fail",
        )
    ok = interval.lower > -margin
    half = interval.halfwidth
    decisive = decisive_ratio is None or half <= decisive_ratio * margin + 1e-12
    clearly_worse = interval.upper <= -margin  # the whole interval lost more than the margin
    level = f"{interval.confidence * 100:.4g}%" if interval.confidence is not None else "95%"
    verdict: CheckVerdict = "pass" if ok else ("fail" if decisive or clearly_worse else "not_decisive")
    return Check(
        name,
        metric,
        v,
        -margin,
        ">",
        verdict != "fail",
        champion=c,
        delta=interval.diff,
        lower=interval.lower,
        upper=interval.upper,
        n=interval.n,
        confidence=interval.confidence,
        halfwidth=half,
        decisive=decisive,
        verdict=verdict,
        reason=""
        if verdict != "fail"
        else f"{metric}: challenger - champion = {interval.diff:+.4f}, {level} interval "
        f"[{interval.lower:+.4f}, {interval.upper:+.4f}] over {interval.n} requests; its lower bound "
        f"is not above -margin {-margin:+.4f}",
    )


def family_confidence(confidence: float, members: int, adjust: str) -> float:
    """The level of each interval in a family of ``members`` checks: Bonferroni's
    ``1 - (1 - confidence) / m``, so the family's intervals hold together at ``confidence``."""
    if adjust == "none" or members <= 1:
        return confidence
    if adjust == "bonferroni":
        return 1.0 - (1.0 - confidence) / members
    raise ValueError(f"gate.slice_adjust: unknown {adjust!r} (bonferroni | none)")


def interval_levels(
    gate: GateConfig, confidence: float, primary: str, compared: list[str]
) -> dict[str, float]:
    """The confidence level of each compared metric's paired interval: ``confidence`` for the
    primary metric (a single test), the family-adjusted level for the slices."""
    slices = [m for m in compared if m != primary and m in slice_metrics({m: 0}, gate.slice_prefixes)]
    level = family_confidence(confidence, len(slices), gate.slice_adjust)
    return {m: (level if m in slices else confidence) for m in compared}


def comparison_checks(
    challenger: dict[str, Any],
    champion: dict[str, Any],
    gate: GateConfig,
    primary: str,
    intervals: dict[str, Interval],
) -> list[Check]:
    """Non-inferiority of the primary metric (blocking where decisive, else undecided) and of
    every slice both models have (blocking only where decisive)."""
    out = [
        non_inferior(
            f"gain:{primary}",
            primary,
            intervals.get(primary),
            gate.margin,
            (challenger.get(primary), champion.get(primary)),
            decisive_ratio=gate.primary_decisive_ratio,
        )
    ]
    for name in slice_metrics(challenger, gate.slice_prefixes):
        if not _finite(challenger.get(name)) or not _finite(champion.get(name)):
            continue  # missing on the challenger is already a failure; on the champion: no baseline
        out.append(
            non_inferior(
                f"slice:{name}",
                name,
                intervals.get(name),
                gate.max_slice_regression,
                (challenger.get(name), champion.get(name)),
                decisive_ratio=gate.slice_decisive_ratio,
            )
        )
    return out


def health_checks(health: TrainingHealth, gate: GateConfig) -> list[Check]:
    """The training set is neither half-empty nor duplicated against its trailing days, and holds
    no non-finite feature value (a model trained on it is not promoted)."""
    out = []
    ok = health.nonfinite_values == 0
    out.append(
        Check(
            "health:nonfinite",
            "train_nonfinite_values",
            float(health.nonfinite_values),
            0.0,
            "<=",
            ok,
            reason=""
            if ok
            else f"the training set holds {health.nonfinite_values} non-finite feature values",
        )
    )
    if health.trailing_rows:
        ref = float(sorted(health.trailing_rows)[len(health.trailing_rows) // 2])
        ratio = health.rows / ref if ref else float("inf")
        ok = gate.min_train_rows_ratio <= ratio <= gate.max_train_rows_ratio
        out.append(
            Check(
                "health:rows",
                "train_rows_ratio",
                ratio,
                gate.min_train_rows_ratio,
                ">=",
                ok,
                reason=""
                if ok
                else f"the training set has {health.rows} rows, {ratio:.2f}x the median "
                f"of its trailing training sets ({ref:.0f}); allowed "
                f"[{gate.min_train_rows_ratio:g}, {gate.max_train_rows_ratio:g}]",
            )
        )
    return out

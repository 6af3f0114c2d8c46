"""``hap gate``: bless or reject the day's registered model against the champion, then move aliases.

Metrics measured on different days are not comparable, so the champion is re-evaluated here on
the challenger's own eval set, from the champion's registered artifact. The rule itself is
``hap.blessing.decide``. A blessed model must also pass a load-and-predict smoke test of its
registered artifact in a fresh process, whose scores must match the in-process bundle; it starts
with the gate and runs while the champion is re-evaluated (``PendingSmokeTest``). The
blessing record (every metric, threshold, delta, verdict and reason) is written to
``metrics/dt=D/blessing.json`` and logged to the model's run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hap.core import layout
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.errors import HapError
from hap.registry import registration as registry
from hap.registry import tracking
from hap.registry.blessing import Decision, Interval, TrainingHealth, decide, interval_levels

BLESSING_FILE = layout.BLESSING_FILE
TAG_MARGIN, TAG_INTERVAL, TAG_REQUESTS = "gate.margin", "gate.interval", "gate.n_requests"
SMOKE_TOLERANCE = 1e-4

_SMOKE_SCRIPT = """
import json, sys
import mlflow.artifacts, mlflow.pyfunc
from mlflow.models import Model
local = mlflow.artifacts.download_artifacts(sys.argv[1])
example = Model.load(local).load_input_example(local)
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(example)
print("SMOKE " + json.dumps({"rows": len(example), "score": [float(x) for x in out["score"]],
                             "routed": [bool(x) for x in out["routed"]]}))
"""


@dataclass
class SmokeTest:
    passed: bool
    uri: str
    rows: int = 0
    max_abs_diff: float | None = None
    seconds: float = 0.0
    reason: str = ""


@dataclass
class Blessing:
    date: str
    model_name: str
    challenger_version: str
    champion_version: str | None
    verdict: str  # pass | fail | undecided (the primary metric's interval too wide to tell)
    reasons: list[str]
    promoted: bool
    eval_set: str
    eval_set_hash: str
    challenger_metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    thresholds: dict[str, Any]
    checks: list[dict[str, Any]] = field(default_factory=list)
    smoke_test: dict[str, Any] | None = None
    previous_version: str | None = None
    created_at: str = ""
    undecided: str = ""  # why the comparison could not decide, and what gate.on_undecided did
    alert: bool = False  # gate.on_undecided: alert asks the on-call engineer to look

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def render(self) -> str:
        head = (
            f"gate {self.date}: {self.model_name} v{self.challenger_version} vs champion "
            f"{('v' + self.champion_version) if self.champion_version else '(none)'}: {self.verdict.upper()}"
        )
        if self.promoted:
            head += " -> champion" + (
                f" (previous: v{self.previous_version})" if self.previous_version else ""
            )
        elif self.verdict in ("fail", "undecided"):
            head += " -> challenger; champion unchanged"
        lines = [head] + ([f"  {self.undecided}"] if self.undecided else [])
        for ch in self.checks:
            if ch.get("name", "").startswith("gain:") and ch.get("lower") is not None:
                lines.append(
                    f"  {ch['metric']}: challenger - champion {ch['delta']:+.4f}, "
                    f"{self.thresholds.get('confidence', 0.95):.0%} interval "
                    f"[{ch['lower']:+.4f}, {ch['upper']:+.4f}] "
                    f"over {ch['n']} requests; margin {self.thresholds.get('margin')}"
                )
        slices = [ch for ch in self.checks if ch.get("name", "").startswith("slice:")]
        if slices:
            verdicts = [ch.get("verdict") for ch in slices]
            count = {v: verdicts.count(v) for v in ("pass", "fail", "not_decisive")}
            lines.append(
                f"  slices: {count['pass']} pass, {count['fail']} fail, {count['not_decisive']} not decisive "
                f"(a slice blocks only when its interval's half-width <= "
                f"{self.thresholds.get('slice_decisive_ratio')} x its margin)"
            )
        return "\n".join([*lines, *(f"  - {r}" for r in self.reasons)])


class PendingSmokeTest:
    """A smoke test started in a fresh interpreter that runs while the gate re-evaluates the
    champion (the interpreter's imports and the model load are most of its seconds), then judged
    by ``result``; ``stop`` ends it when the decision does not need it."""

    def __init__(self, cfg: Config, version: str) -> None:
        import time

        self.uri = registry.model_uri(cfg, version)
        self.timeout = cfg.gate.smoke_timeout_s
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SMOKE_SCRIPT, self.uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=tracking.subprocess_env(cfg),
            cwd=str(cfg.home),
        )

    def result(self, expected: list[float] | None = None) -> SmokeTest:
        """Wait for the test (within ``gate.smoke_timeout_s`` of its start) and judge its scores."""
        import time

        uri = self.uri
        try:
            left = max(self.timeout - (time.perf_counter() - self.start), 0.0)
            stdout, stderr = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.stop()
            return SmokeTest(False, uri, reason=f"smoke test timed out after {self.timeout:g}s")
        seconds = time.perf_counter() - self.start
        lines = [ln for ln in stdout.splitlines() if ln.startswith("SMOKE ")]
        if self.proc.returncode != 0 or not lines:
            tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
            return SmokeTest(
                False, uri, seconds=seconds, reason=f"smoke test failed to load/predict {uri}: {tail[0]}"
            )
        out = json.loads(lines[-1][len("SMOKE ") :])
        scores = out["score"]
        if len(scores) != out["rows"] or not all(math.isfinite(s) for s in scores):
            return SmokeTest(
                False, uri, out["rows"], seconds=seconds, reason="smoke test: missing or non-finite scores"
            )
        diff = None
        if expected is not None:
            diff = max((abs(a - b) for a, b in zip(scores, expected)), default=0.0)
            if len(expected) != len(scores) or diff > SMOKE_TOLERANCE:
                return SmokeTest(
                    False,
                    uri,
                    out["rows"],
                    diff,
                    seconds,
                    reason=f"smoke test: the registered artifact's scores differ from the bundle's "
                    f"(max |diff| {diff:.3g})",
                )
        return SmokeTest(True, uri, out["rows"], diff, seconds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _expected_scores(cfg: Config, date: dt.date) -> list[float]:
    from hap.registry.pyfunc import HapPrerankModel

    example = registry.input_example(cfg, date)
    scorer = HapPrerankModel().load(layout.model_dir(cfg, date))
    return [float(x) for x in scorer.predict(None, example)["score"]]


def _thresholds(cfg: Config, primary: str) -> dict[str, Any]:
    g = cfg.gate
    return {
        "primary_metric": primary,
        "floors": dict(g.floors),
        "margin": g.margin,
        "max_slice_regression": g.max_slice_regression,
        "slice_decisive_ratio": g.slice_decisive_ratio,
        "slice_adjust": g.slice_adjust,
        "confidence": cfg.evaluate.confidence,
        "bootstrap_resamples": cfg.evaluate.bootstrap_resamples,
        "slice_prefixes": list(g.slice_prefixes),
        "cost_metric": g.cost_metric,
        "max_flops_per_request": g.max_flops_per_request,
        "min_train_rows_ratio": g.min_train_rows_ratio,
        "max_train_rows_ratio": g.max_train_rows_ratio,
    }


def paired_intervals(cfg: Config, date: dt.date, champion: Any, metrics: list[str]) -> dict[str, Interval]:
    """(challenger - champion) on each metric, paired over the eval requests both were measured on."""
    from hap.model.evaluate import read_vectors

    mine = read_vectors(cfg, date)
    vectors = {c: mine[c].to_numpy() for c in mine.column_names if c != "request_id"}
    return compare_vectors(
        cfg, (mine["request_id"].to_numpy(), vectors), (champion.request_ids, champion.vectors), metrics
    )


def compare_vectors(
    cfg: Config,
    challenger: tuple[Any, dict[str, Any]],
    champion: tuple[Any, dict[str, Any]],
    metrics: list[str],
) -> dict[str, Interval]:
    """The gate's paired intervals from per-request vectors: ``(request_ids, {"model/<metric>":
    vector})`` of each model (champion ids sorted). The first metric is the primary; the rest
    (the slices) are one family at the adjusted level of ``blessing.interval_levels``."""
    import numpy as np

    from hap.model.metrics import paired_interval

    ids, mine = challenger
    champion_ids, theirs_all = champion
    at = np.searchsorted(champion_ids, ids).clip(max=len(champion_ids) - 1)
    same = champion_ids[at] == ids
    e = cfg.evaluate
    present = [m for m in metrics if f"model/{m}" in mine and f"model/{m}" in theirs_all]
    levels = interval_levels(cfg.gate, e.confidence, metrics[0], present) if metrics else {}
    out = {}
    for metric in present:
        name = f"model/{metric}"
        theirs = np.where(same, theirs_all[name][at], np.nan)
        d, lo, hi, n = paired_interval(
            np.asarray(mine[name], np.float64), theirs, levels[metric], e.bootstrap_resamples, e.seed
        )
        out[metric] = Interval(d, lo, hi, n, levels[metric])
    return out


def training_health(cfg: Config, date: dt.date) -> TrainingHealth:
    """Row counts of the day's training set and of the trailing days' ones; non-finite feature values."""
    import pyarrow.compute as pc

    from hap.core import schema
    from hap.data.split import open_training_set

    def rows(day: dt.date) -> int | None:
        path = layout.training_set(cfg, day)
        return open_training_set(path).count_rows() if path.exists() else None

    today = open_training_set(layout.training_set(cfg, date))
    trailing = [rows(date - dt.timedelta(days=i)) for i in range(1, cfg.gate.health_trailing_days + 1)]
    dense = today.to_table(columns=list(schema.DENSE_FEATURES))
    bad = sum(int(pc.sum(pc.invert(pc.is_finite(dense[c]))).as_py() or 0) for c in dense.column_names)
    return TrainingHealth(today.count_rows(), [r for r in trailing if r is not None], bad)


def blessing_path(cfg: Config, date: dt.date | str):
    return layout.metrics_dir(cfg, date) / BLESSING_FILE


def gate_day(cfg: Config, date: dt.date | str) -> Blessing:
    """Compare the day's registered version with the champion on the same eval set; move aliases."""
    from hap.data.versioning import content_hash
    from hap.model.evaluate import primary_metric

    date = layout.day(date)
    c = tracking.client(cfg)
    challenger, challenger_metrics = _challenger(cfg, date, c)
    eval_path = layout.eval_set(cfg, date)
    champion = registry.alias_version(cfg, registry.CHAMPION, c)
    if champion is not None and champion.version == challenger.version:
        previous = blessing_path(cfg, date)
        if previous.exists():
            return Blessing(**json.loads(previous.read_text()))
        raise HapError(f"v{challenger.version} is already the champion")

    primary = primary_metric(cfg, challenger_metrics)
    pending = PendingSmokeTest(cfg, challenger.version)  # runs beside the champion's re-evaluation
    try:
        champion_metrics, intervals, reasons_extra = _champion_baseline(
            cfg, date, champion, eval_path, [primary, *_slices(cfg, challenger_metrics)]
        )
        decision: Decision = decide(
            challenger_metrics, champion_metrics, cfg.gate, primary, intervals, training_health(cfg, date)
        )
        reasons = decision.reasons + reasons_extra
        verdict = decision.verdict if not reasons else "fail"
        smoke: SmokeTest | None = None
        if not reasons and decision.promote:
            smoke = pending.result(_expected_scores(cfg, date))
            if not smoke.passed:
                reasons.append(smoke.reason)
                verdict = "fail"
    finally:
        pending.stop()
    promoted = verdict != "fail" and decision.promote

    previous_version = None
    if promoted:
        previous_version = registry.promote(cfg, challenger.version, c)
    else:
        registry.mark_challenger(cfg, challenger.version, c)

    blessing = Blessing(
        date=date.isoformat(),
        model_name=cfg.gate.model_name,
        challenger_version=challenger.version,
        champion_version=champion.version if champion is not None else None,
        verdict=verdict,
        reasons=reasons,
        promoted=promoted,
        eval_set=str(eval_path),
        eval_set_hash=content_hash(eval_path)[0],
        challenger_metrics=challenger_metrics,
        champion_metrics=champion_metrics,
        thresholds=_thresholds(cfg, primary),
        checks=decision.to_dict()["checks"],
        smoke_test=asdict(smoke) if smoke else None,
        previous_version=previous_version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        undecided=decision.undecided if verdict == "undecided" else "",
        alert=decision.alert and verdict == "undecided",
    )
    _record(cfg, c, blessing, challenger.run_id, decision, primary)
    return blessing


def _challenger(cfg: Config, date: dt.date, c: Any) -> tuple[Any, dict[str, Any]]:
    """The day's registered version and its eval metrics; a clear error when a step is missing."""
    iso = date.isoformat()
    challenger = registry.version_for_day(cfg, date, c)
    if challenger is None:
        name = cfg.gate.model_name
        raise HapError(f"no version of '{name}' registered for {iso}; run `hap register --date {iso}` first")
    eval_json = layout.metrics_dir(cfg, date) / layout.EVAL_FILE
    if not eval_json.exists():
        raise HapError(f"no eval metrics at {eval_json}; run `hap evaluate --date {iso}` first")
    return challenger, json.loads(eval_json.read_text())


def _slices(cfg: Config, metrics: dict[str, Any]) -> list[str]:
    return [m for m in metrics if m.startswith(tuple(cfg.gate.slice_prefixes))]


def _champion_baseline(
    cfg: Config, date: dt.date, champion: Any, eval_path: Path, compared: list[str]
) -> tuple[dict[str, Any] | None, dict[str, Interval], list[str]]:
    """The champion re-evaluated on the challenger's eval set: its metrics, the paired intervals of
    ``compared`` and, when it cannot be re-evaluated, the reason (no comparable baseline)."""
    from hap.model.evaluate import evaluate_bundle, json_metrics

    if champion is None:
        return None, {}, []
    try:
        champion_bundle = registry.load_bundle_of(cfg, champion.version)
        result = evaluate_bundle(cfg, champion_bundle, eval_path, yardsticks=False)
        return json_metrics(result.metrics), paired_intervals(cfg, date, result, compared), []
    except Exception as err:  # a champion we cannot re-evaluate gives no comparable baseline
        return {}, {}, [f"could not re-evaluate champion v{champion.version} on this eval set: {err}"]


def _record(
    cfg: Config, c: Any, blessing: Blessing, run_id: str | None, decision: Decision, primary: str
) -> None:
    """Write blessing.json and tag the version (verdict, reason, margin, interval) and its run."""
    name, version, verdict = blessing.model_name, blessing.challenger_version, blessing.verdict
    path = blessing_path(cfg, layout.day(blessing.date))
    atomic_write_json(path, asdict(blessing))
    c.set_model_version_tag(name, version, registry.TAG_VERDICT, verdict)
    reason = "; ".join(blessing.reasons) or blessing.undecided or "ok"
    c.set_model_version_tag(name, version, registry.TAG_REASON, reason[:4000])
    c.set_model_version_tag(name, version, TAG_MARGIN, f"{cfg.gate.margin:g}")
    gain = next((ch for ch in decision.checks if ch.name == f"gain:{primary}"), None)
    if gain is not None and gain.lower is not None:
        interval = f"{primary} {gain.delta:+.4f} [{gain.lower:+.4f}, {gain.upper:+.4f}]"
        c.set_model_version_tag(name, version, TAG_INTERVAL, interval)
        c.set_model_version_tag(name, version, TAG_REQUESTS, str(gain.n))
    if run_id:
        c.log_artifact(run_id, str(path), artifact_path="gate")
        c.set_tag(run_id, registry.TAG_VERDICT, verdict)

"""Validate a day's landing files with the Great Expectations suites before ingest may publish it.

``validate_day`` reads ``landing/dt=D/{exposure,ranking,fullflow}.parquet``, runs
``expectations/*.json`` through GX on frames prepared pyarrow-side (``hap.data.frames``), and writes
``validation/dt=D/summary.json`` plus the GX Data Docs under ``validation/dt=D/docs/``.

- Pass: the ``_VALIDATED.json`` marker is written with the size and modification time of each
  landing file; ``ingest`` publishes only a day whose marker matches its files, and ``split`` and
  ``train`` require the marker. The validated lake therefore never holds an unvalidated day.
- Fail: the landing day moves to ``quarantine/dt=D/`` with the result (``hap.data.quarantine``) and
  ``ValidationFailed`` carries a message naming each file, suite, failed expectation, bad-row
  count and examples. The CLI prints it without a traceback and exits non-zero.

Unreadable input (missing day or file, zero bytes, not Parquet) fails the same way, and so does a
late or extra file in the day's folder. The volume and distribution checks compare the day with
the trailing days that passed, read from their summaries (each holds its day's row counts and
distribution profile); thresholds are in ``params.yaml`` under ``validation:``, contract values
(id space, ranges, per-request counts) under ``contract:``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hap.core import layout, schema
from hap.core.atomic import atomic_write_json
from hap.core.config import Config
from hap.core.engine import Mapper, local_map
from hap.core.errors import HapError, ValidationFailed
from hap.data import day_profile, markers
from hap.data import frames as vf
from hap.data.bucket_checks import KEY_BATCHES, KEYS_DIR, check_bucket, check_key_part
from hap.data.buckets import DayBuckets, cut_day
from hap.data.gx_runner import Finding, GxRunner, merge_findings, warm_up
from hap.data.quarantine import quarantine_day, release_quarantine  # noqa: F401 - the public API lives here too
from hap.data.suites import KEY_COLUMNS, load_suite_json

SUMMARY_FILE = layout.VALIDATION_SUMMARY_FILE
DOCS_DIR = "docs"
SUITED = ("exposure", "ranking")  # raw logs whose volume is checked against the trailing days


@dataclass
class ValidationReport:
    date: dt.date
    findings: list[Finding] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    docs: Path | None = None
    seconds: float = 0.0
    quarantined_to: Path | None = None
    profile: dict[str, Any] | None = None

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.warning]

    @property
    def success(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date.isoformat(),
            "status": "passed" if self.success else "failed",
            "rows": self.rows,
            "expectations": len(self.findings),
            "failed": [f.to_dict() for f in self.failures],
            "warnings": [f.to_dict() for f in self.warnings],
            "passed": sum(f.success for f in self.findings),
            "params": {
                k: str(v) if isinstance(v, (dt.datetime, dt.date)) else v for k, v in self.params.items()
            },
            "docs": str(self.docs) if self.docs else None,
            "seconds": round(self.seconds, 3),
            "profile": self.profile,
        }

    def render(self) -> str:
        if self.success:
            head = (
                f"validated {self.date}: {len(self.findings)} expectations passed "
                f"({', '.join(f'{k}={v}' for k, v in self.rows.items())} rows) in {self.seconds:.1f}s"
            )
        else:
            head = (
                f"validation of {self.date} failed: {len(self.failures)} failed expectation(s) "
                f"of {len(self.findings)}"
            )
        lines = [head]
        lines += [f"  FAIL {f.render()}" for f in self.failures]
        lines += [f"  WARN {f.render()}" for f in self.warnings]
        if self.quarantined_to:
            lines.append(
                f"  the day was moved to {self.quarantined_to}; fix the data, then run "
                f"`hap release-quarantine --date {self.date}`"
            )
        if self.docs:
            lines.append(f"  Data Docs: {self.docs}")
        return "\n".join(lines)


# ---- parameters ---------------------------------------------------------------------------------------
def trailing_summaries(cfg: Config, date: dt.date) -> list[dict[str, Any]]:
    """Summaries of the trailing days that passed validation, newest first."""
    out = []
    for back in range(1, cfg.validation.volume_trailing_days + 1):
        path = layout.validation_day(cfg, date - dt.timedelta(days=back)) / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if summary.get("status") == "passed":
            out.append(summary)
    return out


def trailing_rows(cfg: Config, date: dt.date) -> dict[str, list[int]]:
    """Row counts of the trailing days that passed validation, from their summaries."""
    summaries = trailing_summaries(cfg, date)
    return {t: [int(s["rows"][t]) for s in summaries if t in s.get("rows", {})] for t in SUITED}


def contract_params(cfg: Config) -> dict[str, Any]:
    """The suites' contract values: the id space, the cascade's shape, every dense range."""
    con = cfg.contract
    missing = [c for c in ("dwell", "true_affinity", *schema.DENSE_FEATURES) if c not in con.ranges]
    if missing:
        raise HapError(
            f"params.yaml contract.ranges has no range for {missing}: every dense column needs one"
        )
    params: dict[str, Any] = {
        "id_max": con.hash_buckets - 1,
        "seq_len": con.seq_len,
        "content_type_max": con.n_content_types - 1,
        "exposed_per_request": con.exposed_per_request,
        "rank_keep": con.rank_keep,
        "rank_neg_min_pos": con.rank_keep + 1,
        "prerank_neg_min_pos": con.prerank_keep + 1,
        "rank_neg_per_request": con.rank_neg_per_request,
        "prerank_neg_per_request": con.prerank_neg_per_request,
    }
    for col, (lo, hi) in con.ranges.items():
        params[f"{col}_min"], params[f"{col}_max"] = lo, hi
    return params


def suite_params(cfg: Config, date: dt.date) -> dict[str, Any]:
    """Values of the suites' ``$PARAMETER`` references for ``date``."""
    import math

    import pandas as pd

    v = cfg.validation
    start = pd.Timestamp(date.isoformat(), tz="UTC")
    params: dict[str, Any] = {
        "day_start": start,
        "day_end": start + pd.Timedelta(days=1),
        "ctr_min": v.ctr_min,
        "ctr_max": v.ctr_max,
        "fullflow_min_requests": v.fullflow_min_requests,
        "fullflow_min_clicks": v.fullflow_min_clicks,
        "distinct_ratio_min": v.distinct_ratio_min,
        "dense_shift_max": v.dense_shift_max,
        "content_mix_tvd_max": v.content_mix_tvd_max,
        "click_position_tvd_max": v.click_position_tvd_max,
        **contract_params(cfg),
    }
    history = trailing_rows(cfg, date)
    for t in SUITED:
        if len(history[t]) >= v.volume_min_history:
            median = statistics.median(history[t])
            params[f"{t}_rows_min"] = max(1, math.ceil(v.volume_min_ratio * median))
            # exclusive: a day at exactly volume_max_ratio x the median (a duplicated day at 2x) fails
            params[f"{t}_rows_max"] = max(1, math.ceil(v.volume_max_ratio * median) - 1)
        else:
            params[f"{t}_rows_min"], params[f"{t}_rows_max"] = 1, None
        params[f"{t}_history_days"] = len(history[t])
    return params


# ---- running the checks --------------------------------------------------------------------------------
def _failed(
    file: str, suite: str, check: str, error: str, why: str = "", severity: str = "critical"
) -> Finding:
    """A check of validation's own, not a GX expectation, that failed with ``error``."""
    return Finding(
        file=file, suite=suite, expectation=check, success=False, severity=severity, why=why, error=error
    )


def _problem_finding(problem: vf.ReadProblem, suite: str) -> Finding:
    return _failed(
        problem.file, suite, problem.check, problem.message, why="the file must be readable Parquet"
    )


def _missing_day(landing: Path) -> Finding:
    error = f"missing day: {landing} does not exist"
    return _failed(str(landing), "landing", "day_exists", error, why="a day of logs must have landed")


def _drift_findings(
    cfg: Config, date: dt.date, report: ValidationReport, runner: GxRunner, parts: list[dict[str, Any]]
) -> None:
    """Today's distribution profile (merged from the buckets), and its checks against the trailing
    validated days."""
    report.profile = day_profile.merge_profiles(parts)
    refs = [s["profile"] for s in trailing_summaries(cfg, date) if s.get("profile")]
    if len(refs) < cfg.validation.distribution_min_history:
        return
    frame = day_profile.drift_frame(report.profile, refs)
    files = ", ".join(str(layout.raw_log(cfg, date, n)) for n in SUITED)
    report.findings += runner.run(
        load_suite_json("exposure"), "drift", frame, report.params, f"{files} (vs {len(refs)} trailing days)"
    )


def _bucket_findings(
    cfg: Config, report: ValidationReport, runner: GxRunner, cut: DayBuckets, mapper: Mapper
) -> None:
    """The per-request checks bucket by bucket, the cross-request keys partition by partition, then
    the day-level checks on values reduced from the buckets' counts."""
    cut.store.remove(cut.store.join(KEYS_DIR))  # a re-validation writes them afresh
    examples = cfg.validation.examples
    results = mapper(functools.partial(check_bucket, cfg, cut, report.params), cut.ids)
    report.findings += merge_findings([r.findings for r in results], examples)
    failing = [r.bucket for r in results if any(f.failed for f in r.findings)]
    if failing and runner.docs_dir is not None:  # the first bad bucket's row checks, in the Data Docs
        check_bucket(cfg, cut, report.params, failing[0], runner=runner)
    parts = [(batch, k) for batch in KEY_BATCHES for k in cut.ids]
    report.findings += merge_findings(
        mapper(functools.partial(check_key_part, cfg, cut, report.params), parts), examples
    )
    totals: dict[str, int] = {}
    for r in results:
        for key, n in r.counts.items():
            totals[key] = totals.get(key, 0) + n
    for name, frame in vf.day_frames(totals).items():
        for finding in runner.run(load_suite_json(name), "day", frame, report.params, cut.raw[name]):
            finding.observed = frame[finding.args["column"]].item()  # the day's value, not "1 bad row"
            finding.bad_rows = finding.rows = None
            finding.examples = []
            report.findings.append(finding)
    _drift_findings(cfg, cut.date, report, runner, [r.profile for r in results])


def _open_logs(cfg: Config, date: dt.date) -> tuple[dict[str, Any], list[Finding]]:
    """Each raw log opened by its footer, and a finding for each that cannot be."""
    handles, problems = {}, []
    for name in schema.RAW_LOGS:
        handle, problem = vf.open_parquet(layout.raw_log(cfg, date, name))
        if problem:
            problems.append(_problem_finding(problem, f"{name}_log"))
        else:
            handles[name] = handle
    return handles, problems


def _schema_findings(
    cfg: Config,
    date: dt.date,
    report: ValidationReport,
    runner: GxRunner,
    handles: dict[str, Any],
    cut: DayBuckets,
) -> None:
    """The schema checks of each readable log, on the row and null counts its cut gathered."""
    for name, handle in handles.items():
        stats = cut.files[name]
        path = layout.raw_log(cfg, date, name)
        if stats.problem:
            report.findings.append(_problem_finding(vf.unreadable(path, stats.problem), f"{name}_log"))
            continue
        report.rows[name] = stats.rows
        contract, keys = schema.RAW_LOGS[name], KEY_COLUMNS[name]
        frame = vf.schema_frame_of(handle.schema_arrow, stats.null_counts, contract, keys)
        report.findings += runner.run(load_suite_json(name), "schema", frame, report.params, str(path))


def check_day(
    cfg: Config, date: dt.date, docs_dir: Path | None = None, mapper: Mapper = local_map
) -> ValidationReport:
    """Run every check on the day's landing files; no side effects besides the day's buckets
    (``hap.data.buckets``) and the Data Docs."""
    started = time.perf_counter()
    report = ValidationReport(date=date, params=suite_params(cfg, date))
    landing = layout.landing_day(cfg, date)
    if not landing.exists():
        report.findings.append(_missing_day(landing))
        report.seconds = time.perf_counter() - started
        return report

    warm_up()  # GX imports while the day is cut
    handles, problems = _open_logs(cfg, date)
    cut = cut_day(cfg, date, list(handles), mapper) if handles else None
    v = cfg.validation
    runner = GxRunner(docs_dir, v.examples, v.extra_columns, v.on_distribution_shift)
    report.findings += runner.run(
        load_suite_json("landing"), "files", vf.landing_files(landing), report.params, str(landing)
    )
    report.findings += problems
    if cut is not None:
        _schema_findings(cfg, date, report, runner, handles, cut)
    readable = len(report.rows) == len(schema.RAW_LOGS)
    schema_ok = not any(f.failed and f.gates for f in report.findings if f.suite != "landing.files")
    if cut is not None and readable and schema_ok:
        _bucket_findings(cfg, report, runner, cut, mapper)
    elif cut is not None:
        report.findings.append(
            Finding(
                file=str(landing),
                suite="landing",
                expectation="row_checks",
                success=True,
                severity="warning",
                why="row-level and per-request checks skipped: a file is unreadable or breaks the schema",
            )
        )
    try:
        report.docs = runner.build_docs()
    except Exception as err:  # Data Docs are a convenience; a rendering bug must not hide the verdict
        report.findings.append(
            _failed(str(docs_dir), "docs", "build_data_docs", str(err)[:300], severity="warning")
        )
    report.seconds = time.perf_counter() - started
    return report


def validate_day(cfg: Config, date: dt.date | str, mapper: Mapper = local_map) -> ValidationReport:
    """Validate one landing day; mark it validated, or quarantine it and raise ``ValidationFailed``.
    ``mapper`` runs the per-bucket checks (``hap.core.engine``)."""
    date = layout.day(date)
    if markers.is_quarantined(cfg, date):
        raise ValidationFailed(
            f"validate: {date} is in quarantine ({layout.quarantine_day(cfg, date)}); fix the data, run "
            f"`hap release-quarantine --date {date}`, then validate again"
        )
    markers.clear_marker(cfg, date)
    out_dir = layout.validation_day(cfg, date)
    docs_dir = out_dir / DOCS_DIR if cfg.validation.data_docs else None
    report = check_day(cfg, date, docs_dir, mapper)
    summary = report.to_dict()
    if not report.success:
        report.quarantined_to = layout.quarantine_day(cfg, date)
        summary = report.to_dict()
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
        quarantine_day(
            cfg, date, {"step": "validate", **{k: v for k, v in summary.items() if k != "profile"}}
        )
        raise ValidationFailed(report.render())
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    markers.mark_validated(
        cfg,
        date,
        {
            "summary": str(out_dir / SUMMARY_FILE),
            "rows": report.rows,
            "warnings": len(report.warnings),
            "docs": summary["docs"],
            "files": markers.landing_stamp(cfg, date),
        },
    )
    return report


# ---- the training set ------------------------------------------------------------------------------------
def check_training_set(cfg: Config, date: dt.date | str, docs_dir: Path | None = None) -> ValidationReport:
    """Run ``expectations/training_set.json`` on the training set of the window ending ``date``."""
    date = layout.day(date)
    started = time.perf_counter()
    root = layout.training_set(cfg, date)
    report = ValidationReport(date=date, params=suite_params(cfg, date))
    files = sorted(root.glob("difficulty=*/*.parquet")) if root.exists() else []
    if not files:
        report.findings.append(_failed(str(root), "training_set", "files_exist", "no training set files"))
        return report
    runner = GxRunner(docs_dir, examples=cfg.validation.examples, extra_columns=cfg.validation.extra_columns)
    suite = load_suite_json("training_set")
    for path in files:
        table, problem = vf.read_table(path)
        if problem:
            report.findings.append(_problem_finding(problem, "training_set"))
            continue
        report.rows[str(path.relative_to(root))] = table.num_rows
        findings = runner.run(
            suite,
            "schema",
            vf.schema_frame(table, schema.TRAINING_SET, KEY_COLUMNS["training_set"]),
            report.params,
            str(path),
        )
        report.findings += findings
        if not any(f.failed and f.gates for f in findings):
            frame = vf.training_rows(table, path.parent.name.split("=", 1)[1])
            report.findings += runner.run(suite, "rows", frame, report.params, str(path))
    report.docs = runner.build_docs()
    report.seconds = time.perf_counter() - started
    return report


def validate_training_set(cfg: Config, date: dt.date | str) -> ValidationReport:
    """Raise ``ValidationFailed`` when the training set breaks its suite (nothing is quarantined:
    it is derived data; rebuild it with ``hap split``)."""
    date = layout.day(date)
    out_dir = layout.validation_day(cfg, date) / "training_set"
    report = check_training_set(cfg, date, out_dir / DOCS_DIR if cfg.validation.data_docs else None)
    atomic_write_json(out_dir / SUMMARY_FILE, report.to_dict())
    if not report.success:
        raise ValidationFailed(report.render())
    return report

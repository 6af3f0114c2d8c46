"""What a person watching a run sees: a line per step and day, a paragraph per failed day.

Libraries talk a lot (Prefect's task states, MLflow's pickling warnings and download bars, GX's
temporary folders). ``console(...)`` sends all of that to the run's log file, whose path it prints
first, and keeps the terminal for the ``flows.progress`` logger: the line each step reports when it
ends (``reported``), and the closing paragraph of each failed day (``failure_paragraph``). With
``verbose`` everything stays on the terminal as well. On a Prefect worker nobody installs the
console, so the same lines simply join the flow's log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from hap.core import layout
from hap.core.config import Config

LOGGER = logging.getLogger("flows.progress")
# look-ups, not work: no line of their own when they succeed; a failure is told under the step
# each serves (a user reads "failed at train", not the name of a look-up they never saw)
SILENT_STEPS: dict[str, str] = {"champion": "monitor", "unchanged": "train"}


def step_line(
    day: dt.date | str | None, step: str, outcome: str, seconds: float | None, detail: str = ""
) -> str:
    """``2026-11-03  train        ok        17.2 s  7 epochs on cpu``: aligned, one per step and day
    (``day`` may be a label such as a range of days)."""
    when = day.isoformat() if isinstance(day, dt.date) else (day or "-")
    took = f"{seconds:7.1f} s" if seconds is not None else " " * 9
    return f"{when}  {step:<12} {outcome:<9}{took}  {detail}".rstrip()  # a longer step keeps a space


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe(step: str, result: Any) -> str:
    """A few words on a step's JSON summary (the same dict the daily artifact renders)."""
    r = result if isinstance(result, dict) else {}
    if step == "validate":
        rows = r.get("rows")
        total = sum(v for v in rows.values() if isinstance(v, int)) if isinstance(rows, dict) else rows
        checks = f"{r.get('expectations')} checks, {r.get('failures')} failed, {r.get('warnings')} warnings"
        return f"{total} rows, {checks}"
    if step == "ingest":
        return f"{r.get('requests')} requests, {r.get('samples')} samples into the lake"
    if step == "split":
        return f"{r.get('rows')} training rows, {r.get('eval_requests')} eval requests"
    if step in ("train", "train-on-gpu-pool"):
        return f"{r.get('epochs_run', '?')} epochs on {r.get('device', '?')}"
    if step == "evaluate":
        primary = next((k for k in ("gt_recall@50", "rank50_recall@50", "recall@50") if k in r), None)
        return f"{primary} {_num(r[primary])}" if primary else ""
    if step == "register":
        return f"model version {result}"
    if step == "gate":
        from flows.report import gate_verdict

        return gate_verdict(r)
    if step == "monitor":
        figures = r.get("figures") or {}
        keys = ("hard_neg", "near_margin", "routed", "drift_share")
        shown = [f"{k} {_num(figures[k])}" for k in keys if k in figures]
        from flows.report import alert_text

        alerts = r.get("alerts") or []
        named = f" ({'; '.join(alert_text(a) for a in alerts)})" if alerts else ""
        return f"{len(alerts)} alerts{named}; " + ", ".join(shown)
    if step == "version-data":
        dvc = str(r.get("dvc", ""))
        line = "dvc.lock committed, pushed" if dvc.startswith("committed") else f"dvc {dvc}"
        return f"training set and bundle pushed by hash; {line}" if r.get("pushed") else line
    return ""


@contextlib.contextmanager
def reported(step: str, day: dt.date | None) -> Iterator[dict[str, Any]]:
    """Time a step and log its line when it ends, ok or failed. The caller puts the step's result
    in the yielded dict. A failure keeps the step's name on the exception (``failed_step``), so the
    day's closing paragraph can say where it failed."""
    box: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        yield box
    except BaseException as err:
        shown = SILENT_STEPS.get(step, step)
        if getattr(err, "failed_step", None) is None:
            with contextlib.suppress(AttributeError):
                err.failed_step = shown  # type: ignore[attr-defined]
        LOGGER.info(step_line(day, shown, "FAILED", time.perf_counter() - started, type(err).__name__))
        raise
    if step not in SILENT_STEPS:
        detail = describe(step, box.get("result"))
        LOGGER.info(step_line(day, step, "ok", time.perf_counter() - started, detail))


def skipped(day: dt.date, step: str, reason: str) -> None:
    LOGGER.info(step_line(day, step, "skipped", None, reason))


def failed_days(cfg: Config, days: list[dt.date], since: float) -> list[dict[str, Any]]:
    """The summaries of this run's failed days (``daily_run.json`` is written even on failure)."""
    failed = []
    for day in days:
        path = layout.metrics_dir(cfg, day) / layout.DAILY_RUN_FILE
        if path.exists() and path.stat().st_mtime >= since:
            summary = json.loads(path.read_text())
            if summary.get("status") == "failed":
                failed.append(summary)
    return failed


def failure_paragraph(summary: dict[str, Any], log_path: Path | None = None) -> str:
    """One paragraph for a failed day, from its ``daily_run.json``: what failed, for which day,
    why, and what to do next."""
    day, step = summary.get("date", "?"), summary.get("failed_step") or "a step"
    error = " ".join(str(summary.get("error") or "no reason recorded").split())
    kind = summary.get("error_type") or "error"
    text = f"{day} failed at {step} ({kind}): {error.rstrip('.')}."
    quarantine = summary.get("quarantine")
    if quarantine:
        text += " Nothing of the day was published, no model was trained on it, and the champion stayed."
        if str(quarantine) not in error:  # a step's own message usually says where the day went
            text += f" The day is in {quarantine}: fix its files, then `hap release-quarantine --date {day}`."
        text += f" Then re-run it: `hap run --date {day}`."
    elif summary.get("expected", True):
        gate = summary.get("gate") or {}
        if gate.get("promoted", gate.get("blessed")):  # a step after the gate failed: the gate stands
            version = summary.get("model_version")
            text += f" The gate had promoted v{version} to champion before this step; that stands."
        else:
            text += " The champion did not move."
        text += f" To do: fix the cause above, then `hap run --date {day}`."
    else:
        text += (
            " This failure was not expected (transient faults were retried first): its traceback is"
            " in the log, or re-run with --verbose to see it here."
        )
    if log_path is not None:
        text += f" Full log: {log_path}."
    return text


def _mute_library_consoles(term_handler: logging.Handler) -> None:
    """Drop what the libraries' own console handlers would print (Prefect's task states): the run
    log's file handler (``flows.common.log_to_file``, which sets Prefect's logging up first)
    already has every record, DEBUG included."""
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            console_like = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if console_like and handler is not term_handler and type(handler).__name__ != "APILogHandler":
                handler.addFilter(lambda record: False)


@contextlib.contextmanager
def console(log_path: Path, verbose: bool = False) -> Iterator[TextIO]:
    """The terminal, for the run's own report. Unless ``verbose``, file descriptors 1 and 2 point
    at ``log_path`` inside the block, so whatever a library or a child process (the temporary
    Prefect server) prints lands in the log, not on the screen."""
    sys.stdout.flush()
    sys.stderr.flush()
    term = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    print(f"full log: {log_path}", file=term)
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    saved: tuple[int, int] | None = None
    if not verbose:
        saved = os.dup(1), os.dup(2)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        _mute_library_consoles(handler)
    try:
        yield term
    finally:
        LOGGER.removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        term.close()

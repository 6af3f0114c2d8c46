"""Run the JSON suites with Great Expectations 1.x on in-memory frames, and render Data Docs.

One ephemeral GX context per validation run; each (suite, batch) pair becomes a GX
``ValidationDefinition`` over a pandas dataframe asset, run with the suite parameters. Results
are stored in the context, so ``build_docs`` renders the standard Data Docs site (HTML) into the
day's validation folder. Results come back as flat ``Finding`` records for the summary and the
error message.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hap.data.suites import DISTRIBUTION_NOTE, EXTRA_COLUMNS_NOTE

ARG_KEYS = (
    "column",
    "column_A",
    "column_B",
    "column_list",
    "column_set",
    "value_set",
    "type_",
    "min_value",
    "max_value",
    "row_condition",
)


@dataclass
class Finding:
    """One expectation's outcome (or one unreadable file), in the shape the summary and message use."""

    file: str
    suite: str
    expectation: str
    success: bool
    severity: str = "critical"
    args: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    bad_rows: int | None = None
    rows: int | None = None
    observed: Any = None
    examples: list[Any] = field(default_factory=list)
    error: str | None = None
    gates: bool = True  # a failure here makes the row-level checks meaningless (unreadable, wrong schema)

    @property
    def failed(self) -> bool:
        return not self.success and self.severity == "critical"

    @property
    def warning(self) -> bool:
        return not self.success and self.severity != "critical"

    def render(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.args.items())
        head = f"{self.file} [suite {self.suite}] {self.expectation}({args})"
        if self.why:
            head += f" -- {self.why}"
        if self.error:
            return f"{head}: {self.error}"
        parts = []
        if self.bad_rows is not None:
            parts.append(
                f"{self.bad_rows} bad row(s)" + (f" of {self.rows}" if self.rows is not None else "")
            )
        if self.observed is not None:
            parts.append(f"observed {_short(self.observed)}")
        if self.examples:
            parts.append(f"e.g. {_short(self.examples, 300)}")
        return f"{head}: {'; '.join(parts) or 'failed'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(value: Any, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON-friendly copies of GX result values (numpy scalars, timestamps, tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


@functools.cache
def warm_up() -> threading.Thread:
    """Import Great Expectations in a background thread, once per process. Its import costs about
    4 s; started before the day is cut (pyarrow work that releases the GIL), it is mostly done by
    the time the first suite runs. ``GxRunner`` waits for it, so no two threads import GX at once."""
    thread = threading.Thread(
        target=importlib.import_module, args=("great_expectations",), name="gx-import", daemon=True
    )
    thread.start()
    return thread


def dask_setup(worker: Any) -> None:
    """Dask's preload hook (``engine.worker_preload``): a worker starts importing GX as it comes
    up, while its first tasks (the cut) run, instead of when its first bucket's checks start."""
    warm_up()


class GxRunner:
    """A throwaway GX context: add suites and frames, run, collect findings, render docs."""

    def __init__(
        self,
        docs_dir: Path | None,
        examples: int = 5,
        extra_columns: str = "warn",
        on_distribution_shift: str = "quarantine",
        reuse: bool = False,
        quick: bool = False,
    ) -> None:
        warm_up().join()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.execution_engine import pandas_execution_engine

        from hap.data import gx_rules  # registers the verdict pass's expectations with GX

        # GX fingerprints every frame under HASH_THRESHOLD bytes (an md5 of pandas' row hashes) for
        # its batch markers, which nothing here reads: a third of GX's time on a bucket (measured:
        # 1.2 of 3.9 s at 100k requests). A module setting, not a patch: if a GX upgrade drops it,
        # only the speed-up goes, and tests/data/test_gx_rules.py says so.
        pandas_execution_engine.HASH_THRESHOLD = 0

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.gx = gx
        self._gx_rules = gx_rules  # imported here, after GX
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.ctx.add_data_docs_site(
                site_name="hap",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        self.source = self.ctx.data_sources.add_pandas("hap")
        self.examples = examples
        self._names: set[str] = set()
        self.extra_columns = extra_columns
        self.on_distribution_shift = on_distribution_shift
        self.reuse = reuse  # keep suites and validation definitions by name, for the next bucket
        self._definitions: dict[str, Any] = {}
        self._rules: dict[str, dict[str, list]] = {}  # verdict definition -> its folded rules
        self._passed: dict[tuple[str, str], list[Finding]] = {}  # (definition, parameters) -> findings
        # verdicts first, details only for a batch that fails (bucket checks: their passing findings
        # are merged into the day's and never shown one by one)
        self.quick = quick

    def _expectations(self, suite_json: dict[str, Any], batch: str) -> list[dict[str, Any]]:
        """The suite's expectations on ``batch``, their severities set by the run's settings."""
        chosen = []
        for exp in suite_json["expectations"]:
            if exp.get("meta", {}).get("batch") != batch:
                continue
            exp = copy.deepcopy(exp)
            if exp["meta"].get("check") == EXTRA_COLUMNS_NOTE:
                exp["severity"] = "critical" if self.extra_columns == "fail" else "warning"
            if exp["meta"].get("check") == DISTRIBUTION_NOTE:
                exp["severity"] = "critical" if self.on_distribution_shift == "quarantine" else "warning"
            chosen.append(exp)
        return chosen

    def _definition(self, suite_json: dict[str, Any], batch: str, verdicts: bool = False) -> Any:
        """The GX validation definition of a suite's ``batch`` part (``verdicts``: its rules folded
        for the verdict pass, ``hap.data.gx_rules``); ``None`` when the batch has no expectation."""
        name = f"{suite_json['name']}.{batch}" + (".verdicts" if verdicts else "")
        if self.reuse and name in self._definitions:  # built for an earlier bucket
            return self._definitions[name]
        expectations = self._expectations(suite_json, batch)
        if not expectations:
            return None
        if name in self._names:  # the same suite on another file (a training-set partition)
            name = f"{name}.{len(self._names)}"
        self._names.add(name)
        if verdicts:
            expectations, self._rules[name] = self._gx_rules.fold(expectations)
        suite = self.ctx.suites.add(
            self.gx.ExpectationSuite(
                name=name, expectations=expectations, meta={**suite_json.get("meta", {}), "batch": batch}
            )
        )
        definition = self.ctx.validation_definitions.add(
            self.gx.ValidationDefinition(
                name=name,
                data=self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole"),
                suite=suite,
            )
        )
        self._definitions[name] = definition
        return definition

    def run(
        self, suite_json: dict[str, Any], batch: str, frame: pd.DataFrame, params: dict[str, Any], file: str
    ) -> list[Finding]:
        """Run the ``batch`` part of a suite on ``frame``; one ``Finding`` per expectation.

        ``quick`` runs verdicts first: the batch's rules folded into a few multi-column GX
        expectations (``hap.data.gx_rules``), for their verdicts only (measured: GX's work on a
        bucket of a 100k-request day 1.6 -> 0.5 s, with the fingerprint off). A batch that passes
        them passed every expectation of the suite, and each gets a passing finding; one that fails
        or errors runs again with the suite's own expectations, for their counts and examples."""
        definition = self._definition(suite_json, batch)
        if definition is None:
            return []
        if self.quick:
            verdicts = self._definition(suite_json, batch, verdicts=True)
            rules = self._gx_rules.rule_parameters(self._rules[verdicts.name], params)
            result = self._validate(verdicts, frame, {**params, **rules}, {"result_format": "BOOLEAN_ONLY"})
            if all(r.success for r in result.results):
                return self._passing(definition, params, file, len(frame))
        result = self._validate(definition, frame, params, self._detailed_format(frame))
        return [self._finding(r, definition.suite.name, file, len(frame)) for r in result.results]

    def _passing(self, definition: Any, params: dict[str, Any], file: str, rows: int) -> list[Finding]:
        """Each expectation of a batch that passed its verdict pass, as GX reports a pass: its
        keyword arguments with the run's parameters filled (GX's own substitution), the rows it
        saw (the frame's, unknown where a row condition filtered them)."""
        key = (definition.name, json.dumps(params, sort_keys=True, default=str))
        if key not in self._passed:
            by_column: dict[Any, list[Finding]] = {}
            for expectation in definition.suite.expectations:
                config = expectation.configuration
                config.process_suite_parameters(params)
                config = config.to_domain_obj().configuration  # GX's field types (bounds as floats)
                finding = self._finding_of(config, {}, None, True, definition.suite.name, "", None)
                by_column.setdefault(config.kwargs.get("column"), []).append(finding)
            # in GX's result order: expectations grouped by their column, in order of appearance
            found = [f for group in by_column.values() for f in group]
            # one day's parameters at a time: a worker's runner outlives the day
            self._passed = {k: v for k, v in self._passed.items() if k[1] == key[1]}
            self._passed[key] = found
        findings = copy.deepcopy(self._passed[key])
        for f in findings:
            f.file = file
            f.rows = None if "row_condition" in f.args else rows
        return findings

    def _detailed_format(self, frame: pd.DataFrame) -> dict[str, Any]:
        """Counts, example values and example request ids (or columns, or files) of what failed."""
        result_format: dict[str, Any] = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": self.examples,
        }
        index_cols = (
            [c for c in ("request_id", "column", "file") if c in frame.columns][:1] if len(frame) else []
        )
        if index_cols:
            result_format["unexpected_index_column_names"] = index_cols
        return result_format

    def _validate(
        self, definition: Any, frame: pd.DataFrame, params: dict[str, Any], result_format: dict[str, Any]
    ) -> Any:
        # Copy-on-write: GX's pandas engine copies the whole frame for every filter it applies, even
        # one that keeps every row (measured: a third of a bucket's validation time); under
        # copy-on-write those copies are lazy and nothing is written, so nothing is copied.
        with pd.option_context("mode.copy_on_write", True):
            result = definition.run(
                batch_parameters={"dataframe": frame},
                expectation_parameters=params,
                result_format=result_format,
            )
        # The data source's execution engine keeps the last frame of every asset; a bucket's frames
        # would stay alive while the next bucket's are built (measured: +0.5-0.9 GB of peak RSS).
        self.source.get_execution_engine().batch_manager.batch_data_cache.clear()
        return result

    def _finding(self, res: Any, suite: str, file: str, rows: int) -> Finding:
        return self._finding_of(
            res.expectation_config, res.result or {}, res.exception_info, bool(res.success), suite, file, rows
        )

    def _finding_of(
        self,
        cfg: Any,
        out: dict[str, Any],
        exception_info: dict[str, Any] | None,
        success: bool,
        suite: str,
        file: str,
        rows: int | None,
    ) -> Finding:
        kwargs = cfg.kwargs
        args = {k: _plain(kwargs[k]) for k in ARG_KEYS if kwargs.get(k) is not None}
        if isinstance(args.get("row_condition"), dict):
            args["row_condition"] = args["row_condition"].get("pass_through_filter", args["row_condition"])
        if "column_set" in args:
            args["column_set"] = f"<{len(args['column_set'])} contract columns>"
        severity = getattr(cfg.severity, "value", str(cfg.severity or "critical")).lower()
        error = None
        if exception_info and exception_info.get("raised_exception"):
            error = "could not run: " + str(exception_info.get("exception_message", "")).splitlines()[0][:300]
        examples = out.get("partial_unexpected_index_list") or out.get("partial_unexpected_list") or []
        observed = out.get("observed_value")
        if cfg.type == "expect_table_columns_to_match_set" and out.get("details"):
            observed = _plain(out["details"].get("mismatched"))
        return Finding(
            file=file,
            suite=suite,
            expectation=cfg.type,
            success=success,
            severity=severity,
            args=args,
            why=(cfg.meta or {}).get("why", ""),
            bad_rows=out.get("unexpected_count"),
            rows=out.get("element_count", rows if "unexpected_count" in out else None),
            observed=_plain(observed),
            examples=_plain(list(examples)[: self.examples]),
            error=error,
            gates=(cfg.meta or {}).get("gates", True),
        )

    def build_docs(self) -> Path | None:
        if self.docs_dir is None:
            return None
        self.ctx.build_data_docs(site_names=["hap"])
        return self.docs_dir / "index.html"


@functools.cache
def bucket_runner(examples: int, extra_columns: str, on_distribution_shift: str) -> GxRunner:
    """The GX runner of this worker process, for per-bucket checks (no Data Docs). Building a GX
    context and its suites costs about a second; one per process, reused bucket after bucket,
    keeps that cost out of the per-bucket time. It runs verdicts first (``quick``): a bucket's
    passing findings are only counted in the merge."""
    return GxRunner(None, examples, extra_columns, on_distribution_shift, reuse=True, quick=True)


def merge_findings(parts: list[list[Finding]], examples: int) -> list[Finding]:
    """The per-bucket findings of each expectation merged into one per file, in bucket order: bad
    rows summed, rows summed when every bucket counted them (a row-conditioned check that passed a
    bucket on its verdict alone did not), examples from the first buckets that have some. The
    merged verdicts, counts and examples are the same whatever the number of workers."""
    merged: dict[tuple, Finding] = {}
    for findings in parts:
        for f in findings:
            key = (f.file, f.suite, f.expectation, repr(sorted(f.args.items())))
            into = merged.get(key)
            if into is None:
                merged[key] = copy.deepcopy(f)
                continue
            into.success = into.success and f.success
            into.bad_rows = _add(into.bad_rows, f.bad_rows)
            into.rows = None if into.rows is None or f.rows is None else into.rows + f.rows
            into.examples = (into.examples + f.examples)[:examples]
            into.error = into.error or f.error
            if into.observed is None:
                into.observed = f.observed
    return list(merged.values())


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b

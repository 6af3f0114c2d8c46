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

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.gx = gx
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
        # verdicts first, details only for a batch that fails (bucket checks: their passing findings
        # are merged into the day's and never shown one by one)
        self.quick = quick

    def _suite(self, suite_json: dict[str, Any], batch: str) -> Any:
        name = f"{suite_json['name']}.{batch}"
        if self.reuse and name in self._definitions:  # built for an earlier bucket
            return self._definitions[name].suite
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
        if name in self._names:  # the same suite on another file (a training-set partition)
            name = f"{name}.{len(self._names)}"
        self._names.add(name)
        return self.ctx.suites.add(
            self.gx.ExpectationSuite(
                name=name, expectations=chosen, meta={**suite_json.get("meta", {}), "batch": batch}
            )
        )

    def run(
        self, suite_json: dict[str, Any], batch: str, frame: pd.DataFrame, params: dict[str, Any], file: str
    ) -> list[Finding]:
        """Run the ``batch`` part of a suite on ``frame``; one ``Finding`` per expectation."""
        suite = self._suite(suite_json, batch)
        if not suite.expectations:
            return []
        definition = self._definitions.get(suite.name) if self.reuse else None
        if definition is None:
            asset = self.source.add_dataframe_asset(f"{suite.name}")
            definition = self.ctx.validation_definitions.add(
                self.gx.ValidationDefinition(
                    name=f"{suite.name}",
                    data=asset.add_batch_definition_whole_dataframe("whole"),
                    suite=suite,
                )
            )
            self._definitions[suite.name] = definition
        # Verdicts first (bucket checks): GX's Python-side work per expectation roughly halves without
        # the unexpected values and index lists, which a passing batch does not need (measured:
        # 2.5 s -> 1.5 s a bucket); a failure or an error runs again for its counts and examples.
        quick = self.quick
        result_format = {"result_format": "BOOLEAN_ONLY"} if quick else self._detailed_format(frame)
        result = self._validate(definition, frame, params, result_format)
        if quick and not all(r.success for r in result.results):
            quick = False
            result = self._validate(definition, frame, params, self._detailed_format(frame))
        findings = [self._finding(r, suite.name, file, len(frame)) for r in result.results]
        if quick:  # the rows a passing map check saw: the frame's, unless a row condition filtered it
            for f in findings:
                f.rows = None if "row_condition" in f.args else len(frame)
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
        cfg = res.expectation_config
        kwargs = cfg.kwargs
        args = {k: _plain(kwargs[k]) for k in ARG_KEYS if kwargs.get(k) is not None}
        if isinstance(args.get("row_condition"), dict):
            args["row_condition"] = args["row_condition"].get("pass_through_filter", args["row_condition"])
        if "column_set" in args:
            args["column_set"] = f"<{len(args['column_set'])} contract columns>"
        out = res.result or {}
        severity = getattr(cfg.severity, "value", str(cfg.severity or "critical")).lower()
        error = None
        if res.exception_info and res.exception_info.get("raised_exception"):
            error = (
                "could not run: " + str(res.exception_info.get("exception_message", "")).splitlines()[0][:300]
            )
        examples = out.get("partial_unexpected_index_list") or out.get("partial_unexpected_list") or []
        observed = out.get("observed_value")
        if cfg.type == "expect_table_columns_to_match_set" and out.get("details"):
            observed = _plain(out["details"].get("mismatched"))
        return Finding(
            file=file,
            suite=suite,
            expectation=cfg.type,
            success=bool(res.success),
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

"""The Great Expectations suites of the raw logs and the training set, generated from ``hap.schema``.

The suites live as GX 1.x JSON in ``expectations/`` (reviewed in the repo, loaded with
``gx.ExpectationSuite(**json)``). This module writes them, so the column lists and types never
drift from the contracts: ``python -m hap.data.suites`` regenerates the files and a test checks they
are in sync. Thresholds are ``$PARAMETER`` references filled at run time from ``params.yaml``
(``validation:``, and the id space, ranges and cascade shape in ``contract:``) and from the
trailing validated days (volumes and distribution profiles).

Every expectation carries ``meta.batch``, the frame it runs on (``hap.data.frames``):

- ``files``: one row per entry of the landing day's folder (known contract file or not);
- ``schema``: one row per column of the file or the contract (presence, Arrow type, null count);
- ``rows``: the table's rows, plus derived columns computed pyarrow-side (``has_ranking_row``,
  the click sequence's length, id range and null ids, ``engaged_without_click``,
  ``in_exposure_log``, ``click_unexposed``, ``partition_difficulty``);
- ``positions``: the ranking log's stage positions, a narrow frame: GX copies the whole frame for
  every column with nulls, and the positions are null for the sources that skipped a stage;
- ``rank_neg_positions``, ``prerank_neg_positions``, ``exposed_positions``: the rows of one source
  with the one stage position its checks read, filtered pyarrow-side: a GX row condition filters
  (copies) the whole frame once per expectation, which made these five checks a sixth of a
  bucket's validation time;
- ``requests``: one row per request, aggregated pyarrow-side from both logs (per-request
  structure, display positions, sampling counts);
  ``rows`` and ``requests`` run once per request-hash bucket (``hap.data.buckets``), their findings
  merged per file;
- ``exposure_keys`` and ``content_keys``: the keys that span requests (a user's exposures at an
  instant, a request's content key), partitioned by the key's own hash so that uniqueness is exact
  per partition;
- ``day``: one row of day-level values reduced from the per-bucket aggregates (volume, CTR,
  full-flow requests and clicks);
- ``drift``: one row per statistic of today against the trailing validated days (distinct values,
  dense quantiles, content mix, click share per position); severity follows
  ``validation.on_distribution_shift``.

Extra columns: an unknown column is a **warning** by default (``validation.extra_columns``). A
new upstream column is additive and ingest keeps only contract columns, so it cannot reach
training; failing would stop daily retraining for a harmless change. A renamed column still
fails, because its contract name is then missing. ``extra_columns: fail`` makes it critical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hap.core import schema
from hap.core.config import REPO_ROOT

SUITE_DIR = REPO_ROOT / "expectations"
SUITE_FILES = {
    "landing": "landing.json",
    "exposure": "exposure_log.json",
    "ranking": "ranking_log.json",
    "fullflow": "fullflow_log.json",
    "training_set": "training_set.json",
}
EXTRA_COLUMNS_NOTE = (
    "extra_columns"  # meta.check of the expectation whose severity follows validation.extra_columns
)


def P(name: str) -> dict[str, str]:
    """A suite parameter reference, resolved at run time."""
    return {"$PARAMETER": name}


def _e(kind: str, batch: str, why: str, severity: str = "critical", **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "meta": {"batch": batch, "why": why}, "severity": severity}


KEY_COLUMNS = {  # not-null checked row by row (bad-row counts and examples); other columns via null_count
    "exposure": ("request_id", "timestamp", "user_id", "item_id", "position", "click"),
    "ranking": ("request_id", "item_id", "source"),
    "fullflow": ("request_id", "item_id", "retrieval_pos", "exposed", "click"),
    "training_set": ("dt", "request_id", "item_id", "source", "group", "difficulty", "label"),
}


def _schema_part() -> list[dict[str, Any]]:
    """Checks on the ``columns`` frame: one row per column of the file or the contract, with the
    Arrow type found, the contract type, and the column's null count (``hap.validation_frames``)."""
    why_extra = "no unknown column (warning by default: an additive upstream change, dropped at ingest)"
    return [
        _e(
            "expect_column_values_to_be_in_set",
            "schema",
            "every contract column is present",
            column="in_file",
            value_set=[True],
        ),
        {
            **_e(
                "expect_column_values_to_be_in_set",
                "schema",
                why_extra,
                severity="warning",
                column="in_contract",
                value_set=[True],
            ),
            "meta": {"batch": "schema", "check": EXTRA_COLUMNS_NOTE, "why": why_extra},
        },
        _e(
            "expect_column_pair_values_to_be_equal",
            "schema",
            "each column has its contract Arrow type",
            column_A="arrow_type",
            column_B="contract_type",
            row_condition="in_file & in_contract",
            condition_parser="pandas",
        ),
        {
            **_e(
                "expect_column_values_to_be_between",
                "schema",
                "non-nullable contract columns hold no null",
                column="null_count",
                max_value=0,
                row_condition="in_file & in_contract & ~nullable & ~key",
                condition_parser="pandas",
            ),
            "meta": {
                "batch": "schema",
                "gates": False,
                "why": "non-key, non-nullable contract columns hold no null (keys are checked row by row)",
            },
        },
    ]


DISTRIBUTION_NOTE = "distribution"  # meta.check of checks whose severity follows on_distribution_shift


def _dense(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every dense column: no NaN (pandas counts NaN as null) and inside its finite contract range."""
    out = []
    for c in columns:
        out.append(_e("expect_column_values_to_not_be_null", "rows", f"{c} is a number (no NaN)", column=c))
        out.append(
            _e(
                "expect_column_values_to_be_between",
                "rows",
                f"{c} is finite and inside its contract range (contract.ranges.{c})",
                column=c,
                min_value=P(f"{c}_min"),
                max_value=P(f"{c}_max"),
            )
        )
    return out


def _ids(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Categorical ids lie in the hash space [0, contract.hash_buckets)."""
    return [
        _e(
            "expect_column_values_to_be_between",
            "rows",
            f"{c} is an id of the hash space [0, contract.hash_buckets)",
            column=c,
            min_value=0,
            max_value=P("id_max"),
        )
        for c in columns
    ]


def _non_negative(columns: tuple[str, ...], what: str = "ids are non-negative") -> list[dict[str, Any]]:
    return [
        _e("expect_column_values_to_be_between", "rows", f"{c}: {what}", column=c, min_value=0)
        for c in columns
    ]


def _content_type() -> dict[str, Any]:
    return _e(
        "expect_column_values_to_be_between",
        "rows",
        "content types are codes 0 .. contract.n_content_types - 1",
        column="content_type",
        min_value=0,
        max_value=P("content_type_max"),
    )


def _distribution_part() -> list[dict[str, Any]]:
    """Checks on the ``drift`` frame: one row per statistic of today against the median of the
    trailing validated days (``hap.data.frames.drift_frame``). Severity follows
    ``validation.on_distribution_shift``."""
    checks = [
        (
            "distinct_ratio",
            "min",
            "distinct_ratio_min",
            "a feature keeps its number of distinct values (not collapsed)",
        ),
        (
            "dense_shift",
            "max",
            "dense_shift_max",
            "a dense feature's median and p99 stay near the trailing days'",
        ),
        (
            "content_mix_tvd",
            "max",
            "content_mix_tvd_max",
            "the content-type mix stays near the trailing days'",
        ),
        (
            "click_position_tvd",
            "max",
            "click_position_tvd_max",
            "the share of clicks per display position stays near the trailing days'",
        ),
    ]
    out = []
    for check, side, param, why in checks:
        bound = {"min_value": P(param)} if side == "min" else {"max_value": P(param)}
        exp = _e(
            "expect_column_values_to_be_between",
            "drift",
            why,
            column="value",
            row_condition=f'check=="{check}"',
            condition_parser="pandas",
            **bound,
        )
        exp["meta"]["check"] = DISTRIBUTION_NOTE
        out.append(exp)
    return out


def _not_null(table: str) -> list[dict[str, Any]]:
    return [
        _e("expect_column_values_to_not_be_null", "rows", f"key column {c} is never null", column=c)
        for c in KEY_COLUMNS[table]
    ]


def exposure_suite() -> dict[str, Any]:
    ex = [
        *_schema_part(),
        _e(
            "expect_column_values_to_be_between",
            "day",
            "not empty, and the day's volume within a tolerance of the trailing median",
            column="rows",
            min_value=P("exposure_rows_min"),
            max_value=P("exposure_rows_max"),
        ),
        *_not_null("exposure"),
        _e(
            "expect_compound_columns_to_be_unique",
            "rows",
            "one row per exposed item of a request",
            column_list=["request_id", "item_id"],
        ),
        _e(
            "expect_compound_columns_to_be_unique",
            "rows",
            "one item per display slot of a request",
            column_list=["request_id", "position"],
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "display positions are 1 .. contract.exposed_per_request",
            column="position",
            min_value=1,
            max_value=P("exposed_per_request"),
        ),
        _e(
            "expect_compound_columns_to_be_unique",
            "exposure_keys",
            "the same user is not shown the same item at the same instant twice (replayed logs)",
            column_list=["user_id", "timestamp", "item_id"],
        ),
        *[
            _e(
                "expect_column_values_to_be_in_set",
                "rows",
                f"{col} is a 0/1 label",
                column=col,
                value_set=[0, 1],
            )
            for col in ("click", "like", "comment", "share")
        ],
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "feedback is consistent: no like, comment or share without a click",
            column="engaged_without_click",
            value_set=[False],
        ),
        *_dense(("dwell", *schema.USER_DENSE)),
        _content_type(),
        *_non_negative(("request_id", "user_id", "item_id")),
        *_ids((*schema.USER_CATEGORICAL, *schema.CONTEXT_CATEGORICAL)),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "timestamps fall inside the partition's UTC day",
            column="timestamp",
            min_value=P("day_start"),
            max_value=P("day_end"),
            strict_max=True,
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "the recent-click sequence has exactly contract.seq_len ids",
            column="u_click_seq_len",
            min_value=P("seq_len"),
            max_value=P("seq_len"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "the recent-click sequence holds no null id",
            column="u_click_seq_nulls",
            max_value=0,
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "recent-click ids lie in the hash space [0, contract.hash_buckets)",
            column="u_click_seq_min",
            min_value=0,
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "recent-click ids lie in the hash space [0, contract.hash_buckets)",
            column="u_click_seq_max",
            max_value=P("id_max"),
        ),
        _e(
            "expect_column_values_to_not_be_null",
            "rows",
            "the recent-click sequence is present",
            column="u_click_seq_len",
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "referential integrity: every exposure has a ranking-log row (source 'exposed')",
            column="has_ranking_row",
            value_set=[True],
        ),
        _e(
            "expect_column_values_to_be_between",
            "day",
            "the day's CTR within bounds (a CTR of 0 is a broken click log)",
            column="ctr",
            min_value=P("ctr_min"),
            max_value=P("ctr_max"),
        ),
        *_distribution_part(),
    ]
    return {
        "name": "exposure_log",
        "expectations": ex,
        "meta": {
            "table": "exposure",
            "contract": "hap.core.schema.EXPOSURE_LOG",
            "generated_by": "hap.data.suites",
        },
    }


def ranking_suite() -> dict[str, Any]:
    ex = [
        *_schema_part(),
        _e(
            "expect_column_values_to_be_between",
            "day",
            "not empty, and the day's volume within a tolerance of the trailing median",
            column="rows",
            min_value=P("ranking_rows_min"),
            max_value=P("ranking_rows_max"),
        ),
        *_not_null("ranking"),
        _e(
            "expect_compound_columns_to_be_unique",
            "rows",
            "key: (request_id, item_id, source) is unique",
            column_list=["request_id", "item_id", "source"],
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "source is a known ranking-log source",
            column="source",
            value_set=list(schema.RANKING_SOURCES),
        ),
        *[
            _e(
                "expect_column_values_to_be_between",
                "positions",
                f"{col} is 1-based where present",
                column=col,
                min_value=1,
            )
            for col in ("retrieval_pos", "prerank_pos", "rank_pos")
        ],
        _content_type(),
        *_non_negative(("request_id", "item_id")),
        *_dense(schema.ITEM_DENSE),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "true_affinity is finite where present (contract.ranges.true_affinity)",
            column="true_affinity",
            min_value=P("true_affinity_min"),
            max_value=P("true_affinity_max"),
        ),
        *_ids(schema.ITEM_CATEGORICAL),
        _e(
            "expect_column_values_to_not_be_null",
            "rank_neg_positions",
            "a rank_neg passed the ranking stage",
            column="rank_pos",
        ),
        _e(
            "expect_column_values_to_be_between",
            "rank_neg_positions",
            "rank_neg are ranked below the ranking cut (> 50)",
            column="rank_pos",
            min_value=P("rank_neg_min_pos"),
        ),
        _e(
            "expect_column_values_to_not_be_null",
            "prerank_neg_positions",
            "a prerank_neg passed the pre-ranking stage",
            column="prerank_pos",
        ),
        _e(
            "expect_column_values_to_be_between",
            "prerank_neg_positions",
            "prerank_neg are pre-ranked below the pre-ranking cut (> 200)",
            column="prerank_pos",
            min_value=P("prerank_neg_min_pos"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "exposed_positions",
            "exposed items come from the ranking top",
            column="rank_pos",
            min_value=1,
            max_value=P("rank_keep"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "every logged request has at least one exposure",
            column="n_exposures",
            min_value=1,
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "a request shows at most contract.exposed_per_request items",
            column="n_exposures",
            max_value=P("exposed_per_request"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "display positions of a request start at 1",
            column="position_min",
            min_value=1,
            max_value=1,
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "display positions of a request are exactly 1..k: no gap (largest position == exposures)",
            column="position_gap",
            min_value=0,
            max_value=0,
        ),
        _e(
            "expect_column_values_to_be_unique",
            "content_keys",
            "no request repeats another's user and exposures (content duplicated under new request ids)",
            column="content_key",
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "every exposure of a request is logged in the ranking log and vice versa",
            column="exposed_gap",
            min_value=0,
            max_value=0,
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "sampling: rank_neg per request",
            column="n_rank_neg",
            min_value=P("rank_neg_per_request"),
            max_value=P("rank_neg_per_request"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "sampling: prerank_neg per request",
            column="n_prerank_neg",
            min_value=P("prerank_neg_per_request"),
            max_value=P("prerank_neg_per_request"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "requests",
            "sampling: global_neg_per_pos global negatives per click (n_global_neg - per_pos * clicks == 0)",
            column="global_neg_gap",
            min_value=0,
            max_value=0,
        ),
    ]
    return {
        "name": "ranking_log",
        "expectations": ex,
        "meta": {
            "table": "ranking",
            "contract": "hap.core.schema.RANKING_LOG",
            "generated_by": "hap.data.suites",
        },
    }


def fullflow_suite() -> dict[str, Any]:
    """The eval log: a sample of requests logged with every retrieved candidate."""
    ex = [
        *_schema_part(),
        *_not_null("fullflow"),
        _e(
            "expect_compound_columns_to_be_unique",
            "rows",
            "key: (request_id, item_id) is unique",
            column_list=["request_id", "item_id"],
        ),
        _e(
            "expect_column_values_to_be_between",
            "day",
            "enough full-flow requests for the gate's paired statistics (validation.fullflow_min_requests)",
            column="requests",
            min_value=P("fullflow_min_requests"),
        ),
        _e(
            "expect_column_values_to_be_between",
            "day",
            "the full-flow log has clicks (validation.fullflow_min_clicks): without them nothing ranks",
            column="clicks",
            min_value=P("fullflow_min_clicks"),
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "every full-flow request is in the day's exposure log",
            column="in_exposure_log",
            value_set=[True],
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "click is a 0/1 label",
            column="click",
            value_set=[0, 1],
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "only exposed candidates are clicked",
            column="click_unexposed",
            value_set=[False],
        ),
        *[
            _e(
                "expect_column_values_to_be_between",
                "rows",
                f"{col} is 1-based where present",
                column=col,
                min_value=1,
            )
            for col in ("retrieval_pos", "prerank_pos", "rank_pos")
        ],
        _content_type(),
        *_non_negative(("request_id", "item_id")),
        *_dense(schema.ITEM_DENSE),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "true_affinity is finite where present (contract.ranges.true_affinity)",
            column="true_affinity",
            min_value=P("true_affinity_min"),
            max_value=P("true_affinity_max"),
        ),
        *_ids(schema.ITEM_CATEGORICAL),
    ]
    return {
        "name": "fullflow_log",
        "expectations": ex,
        "meta": {
            "table": "fullflow",
            "contract": "hap.core.schema.FULLFLOW_LOG",
            "generated_by": "hap.data.suites",
        },
    }


def landing_suite() -> dict[str, Any]:
    """The day's folder: exactly the contract's files. A late or extra file fails the day (it may
    hold part of the day's logs); the producer merges it into the contract files or removes it."""
    return {
        "name": "landing",
        "expectations": [
            _e(
                "expect_column_values_to_be_in_set",
                "files",
                "the landing folder holds only exposure/ranking/fullflow.parquet (and _SUCCESS): "
                "a late or extra file is part of no log and is never ignored silently",
                column="known",
                value_set=[True],
            )
        ],
        "meta": {"table": "landing", "generated_by": "hap.data.suites"},
    }


def training_set_suite() -> dict[str, Any]:
    src = "source in {}".format
    ex = [
        *_schema_part(),
        _e("expect_table_row_count_to_be_between", "rows", "the training set is not empty", min_value=1),
        *_not_null("training_set"),
        _e(
            "expect_compound_columns_to_be_unique",
            "rows",
            "key: (dt, request_id, item_id, source) is unique",
            column_list=["dt", "request_id", "item_id", "source"],
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "known source",
            column="source",
            value_set=list(schema.SOURCES),
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "known group",
            column="group",
            value_set=sorted(set(schema.GROUP_OF_SOURCE.values())),
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "known difficulty",
            column="difficulty",
            value_set=[d.value for d in schema.Difficulty],
        ),
        _e("expect_column_values_to_be_in_set", "rows", "labels are 0/1", column="label", value_set=[0, 1]),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "positives are labelled 1",
            column="label",
            value_set=[1],
            row_condition='source=="expose_pos"',
            condition_parser="pandas",
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "negatives are labelled 0",
            column="label",
            value_set=[0],
            row_condition='source!="expose_pos"',
            condition_parser="pandas",
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "hard sources sit in the hard partition",
            column="difficulty",
            value_set=["hard"],
            row_condition=src(list(schema.HARD_SOURCES)),
            condition_parser="pandas",
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "easy sources sit in the easy partition",
            column="difficulty",
            value_set=["easy"],
            row_condition=src(list(schema.EASY_SOURCES)),
            condition_parser="pandas",
        ),
        _e(
            "expect_column_values_to_be_in_set",
            "rows",
            "the Hive partition folder matches the difficulty column",
            column="partition_matches",
            value_set=[True],
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "rank_neg are ranked below the ranking cut",
            column="rank_pos",
            min_value=P("rank_neg_min_pos"),
            row_condition='source=="rank_neg"',
            condition_parser="pandas",
        ),
        _e(
            "expect_column_values_to_be_between",
            "rows",
            "prerank_neg are pre-ranked below the pre-ranking cut",
            column="prerank_pos",
            min_value=P("prerank_neg_min_pos"),
            row_condition='source=="prerank_neg"',
            condition_parser="pandas",
        ),
    ]
    return {
        "name": "training_set",
        "expectations": ex,
        "meta": {
            "table": "training_set",
            "contract": "hap.core.schema.TRAINING_SET",
            "generated_by": "hap.data.suites",
        },
    }


BUILDERS = {
    "landing": landing_suite,
    "exposure": exposure_suite,
    "ranking": ranking_suite,
    "fullflow": fullflow_suite,
    "training_set": training_set_suite,
}


def render(table: str) -> str:
    return json.dumps(BUILDERS[table](), indent=2) + "\n"


def load_suite_json(table: str, directory: Path = SUITE_DIR) -> dict[str, Any]:
    return json.loads((directory / SUITE_FILES[table]).read_text())


def write_all(directory: Path = SUITE_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for table, name in SUITE_FILES.items():
        path = directory / name
        path.write_text(render(table))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all():
        print(f"wrote {p}")

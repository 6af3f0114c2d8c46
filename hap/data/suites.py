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
from hap.data.suite_json import (
    BETWEEN,
    P,
    between,
    expectation,
    in_set,
    not_null,
    unique_together,
    where,
)

SUITE_DIR = REPO_ROOT / "expectations"
SUITE_FILES = {
    "landing": "landing.json",
    "exposure": "exposure_log.json",
    "ranking": "ranking_log.json",
    "fullflow": "fullflow_log.json",
    "training_set": "training_set.json",
}
# meta.check of the expectations whose severity follows validation.extra_columns or on_distribution_shift
EXTRA_COLUMNS_NOTE = "extra_columns"
DISTRIBUTION_NOTE = "distribution"


KEY_COLUMNS = {  # not-null checked row by row (bad-row counts and examples); other columns via null_count
    "exposure": ("request_id", "timestamp", "user_id", "item_id", "position", "click"),
    "ranking": ("request_id", "item_id", "source"),
    "fullflow": ("request_id", "item_id", "retrieval_pos", "exposed", "click"),
    "training_set": ("dt", "request_id", "item_id", "source", "group", "difficulty", "label"),
}
STAGE_POSITIONS = ("retrieval_pos", "prerank_pos", "rank_pos")


# ---- checks shared by several suites, one builder per kind of column ----------------------------
def _schema_part() -> list[dict[str, Any]]:
    """Checks on the ``schema`` frame: one row per column of the file or the contract, with the
    Arrow type found, the contract type, and the column's null count (``hap.data.frames.schema_frame``)."""
    why_extra = "no unknown column (warning by default: an additive upstream change, dropped at ingest)"
    why_nulls = "non-key, non-nullable contract columns hold no null (keys are checked row by row)"
    return [
        in_set("schema", "in_file", "every contract column is present", [True]),
        {
            **in_set("schema", "in_contract", why_extra, [True], severity="warning"),
            "meta": {"batch": "schema", "check": EXTRA_COLUMNS_NOTE, "why": why_extra},
        },
        expectation(
            "expect_column_pair_values_to_be_equal",
            "schema",
            "each column has its contract Arrow type",
            column_A="arrow_type",
            column_B="contract_type",
            **where("in_file & in_contract"),
        ),
        {
            **between(
                "schema",
                "null_count",
                "non-nullable contract columns hold no null",
                max_value=0,
                **where("in_file & in_contract & ~nullable & ~key"),
            ),
            "meta": {"batch": "schema", "gates": False, "why": why_nulls},
        },
    ]


def _key_columns(table: str) -> list[dict[str, Any]]:
    return [not_null("rows", c, f"key column {c} is never null") for c in KEY_COLUMNS[table]]


def _day_volume(table: str) -> dict[str, Any]:
    why = "not empty, and the day's volume within a tolerance of the trailing median"
    return between("day", "rows", why, P(f"{table}_rows_min"), P(f"{table}_rows_max"))


def _labels(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [in_set("rows", c, f"{c} is a 0/1 label", [0, 1]) for c in columns]


def _dense(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every dense column: no NaN (pandas counts NaN as null) and inside its finite contract range."""
    out = []
    for c in columns:
        out.append(not_null("rows", c, f"{c} is a number (no NaN)"))
        why = f"{c} is finite and inside its contract range (contract.ranges.{c})"
        out.append(between("rows", c, why, P(f"{c}_min"), P(f"{c}_max")))
    return out


def _ids(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Categorical ids lie in the hash space [0, contract.hash_buckets)."""
    why = "is an id of the hash space [0, contract.hash_buckets)"
    return [between("rows", c, f"{c} {why}", 0, P("id_max")) for c in columns]


def _non_negative(columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [between("rows", c, f"{c}: ids are non-negative", 0) for c in columns]


def _content_type() -> dict[str, Any]:
    why = "content types are codes 0 .. contract.n_content_types - 1"
    return between("rows", "content_type", why, 0, P("content_type_max"))


def _item_side(positions_batch: str) -> list[dict[str, Any]]:
    """The candidate columns that the ranking and full-flow logs share: stage positions (checked on
    ``positions_batch``), content type, keys, item features and the simulator's true affinity."""
    why_affinity = "true_affinity is finite where present (contract.ranges.true_affinity)"
    return [
        *[between(positions_batch, c, f"{c} is 1-based where present", 1) for c in STAGE_POSITIONS],
        _content_type(),
        *_non_negative(("request_id", "item_id")),
        *_dense(schema.ITEM_DENSE),
        between("rows", "true_affinity", why_affinity, P("true_affinity_min"), P("true_affinity_max")),
        *_ids(schema.ITEM_CATEGORICAL),
    ]


def _click_sequence() -> list[dict[str, Any]]:
    """The recent-click sequence, through the derived columns of its length, null ids and id range."""
    why_space = "recent-click ids lie in the hash space [0, contract.hash_buckets)"
    return [
        between(
            "rows",
            "u_click_seq_len",
            "the recent-click sequence has exactly contract.seq_len ids",
            P("seq_len"),
            P("seq_len"),
        ),
        between("rows", "u_click_seq_nulls", "the recent-click sequence holds no null id", max_value=0),
        between("rows", "u_click_seq_min", why_space, min_value=0),
        between("rows", "u_click_seq_max", why_space, max_value=P("id_max")),
        not_null("rows", "u_click_seq_len", "the recent-click sequence is present"),
    ]


def _distribution_part() -> list[dict[str, Any]]:
    """Checks on the ``drift`` frame: one row per statistic of today against the median of the
    trailing validated days (``hap.data.day_profile.drift_frame``). Severity follows
    ``validation.on_distribution_shift``."""
    checks = [  # (statistic, which bound its parameter sets, why)
        ("distinct_ratio", "min", "a feature keeps its number of distinct values (not collapsed)"),
        ("dense_shift", "max", "a dense feature's median and p99 stay near the trailing days'"),
        ("content_mix_tvd", "max", "the content-type mix stays near the trailing days'"),
        (
            "click_position_tvd",
            "max",
            "the share of clicks per display position stays near the trailing days'",
        ),
    ]
    out = []
    for check, side, why in checks:
        # the bound follows the row condition in these expectations' kwargs (kept for the JSON files)
        exp = expectation(BETWEEN, "drift", why, column="value", **where(f'check=="{check}"'))
        exp["kwargs"][f"{side}_value"] = P(f"{check}_{side}")
        exp["meta"]["check"] = DISTRIBUTION_NOTE
        out.append(exp)
    return out


def _suite(name: str, table: str, expectations: list[dict[str, Any]], contract: str) -> dict[str, Any]:
    meta = {"table": table, "contract": f"hap.core.schema.{contract}", "generated_by": "hap.data.suites"}
    return {"name": name, "expectations": expectations, "meta": meta}


# ---- the suites ---------------------------------------------------------------------------------
def exposure_suite() -> dict[str, Any]:
    ex = [
        *_schema_part(),
        _day_volume("exposure"),
        *_key_columns("exposure"),
        unique_together("rows", ["request_id", "item_id"], "one row per exposed item of a request"),
        unique_together("rows", ["request_id", "position"], "one item per display slot of a request"),
        between(
            "rows",
            "position",
            "display positions are 1 .. contract.exposed_per_request",
            1,
            P("exposed_per_request"),
        ),
        unique_together(
            "exposure_keys",
            ["user_id", "timestamp", "item_id"],
            "the same user is not shown the same item at the same instant twice (replayed logs)",
        ),
        *_labels(("click", "like", "comment", "share")),
        in_set(
            "rows",
            "engaged_without_click",
            "feedback is consistent: no like, comment or share without a click",
            [False],
        ),
        *_dense(("dwell", *schema.USER_DENSE)),
        _content_type(),
        *_non_negative(("request_id", "user_id", "item_id")),
        *_ids((*schema.USER_CATEGORICAL, *schema.CONTEXT_CATEGORICAL)),
        between(
            "rows",
            "timestamp",
            "timestamps fall inside the partition's UTC day",
            P("day_start"),
            P("day_end"),
            strict_max=True,
        ),
        *_click_sequence(),
        in_set(
            "rows",
            "has_ranking_row",
            "referential integrity: every exposure has a ranking-log row (source 'exposed')",
            [True],
        ),
        between(
            "day",
            "ctr",
            "the day's CTR within bounds (a CTR of 0 is a broken click log)",
            P("ctr_min"),
            P("ctr_max"),
        ),
        *_distribution_part(),
    ]
    return _suite("exposure_log", "exposure", ex, "EXPOSURE_LOG")


def _per_request() -> list[dict[str, Any]]:
    """The ranking suite's checks on the ``requests`` frame: one row per request, from both logs."""
    no_gap = "display positions of a request are exactly 1..k: no gap (largest position == exposures)"
    duplicated = "no request repeats another's user and exposures (content duplicated under new request ids)"
    per_pos = "sampling: global_neg_per_pos global negatives per click (n_global_neg - per_pos * clicks == 0)"
    return [
        between("requests", "n_exposures", "every logged request has at least one exposure", 1),
        between(
            "requests",
            "n_exposures",
            "a request shows at most contract.exposed_per_request items",
            max_value=P("exposed_per_request"),
        ),
        between("requests", "position_min", "display positions of a request start at 1", 1, 1),
        between("requests", "position_gap", no_gap, 0, 0),
        expectation("expect_column_values_to_be_unique", "content_keys", duplicated, column="content_key"),
        between(
            "requests",
            "exposed_gap",
            "every exposure of a request is logged in the ranking log and vice versa",
            0,
            0,
        ),
        *[
            between(
                "requests",
                f"n_{s}",
                f"sampling: {s} per request",
                P(f"{s}_per_request"),
                P(f"{s}_per_request"),
            )
            for s in ("rank_neg", "prerank_neg")
        ],
        between("requests", "global_neg_gap", per_pos, 0, 0),
    ]


def ranking_suite() -> dict[str, Any]:
    ex = [
        *_schema_part(),
        _day_volume("ranking"),
        *_key_columns("ranking"),
        unique_together(
            "rows", ["request_id", "item_id", "source"], "key: (request_id, item_id, source) is unique"
        ),
        in_set("rows", "source", "source is a known ranking-log source", list(schema.RANKING_SOURCES)),
        *_item_side("positions"),
        not_null("rank_neg_positions", "rank_pos", "a rank_neg passed the ranking stage"),
        between(
            "rank_neg_positions",
            "rank_pos",
            "rank_neg are ranked below the ranking cut (> 50)",
            P("rank_neg_min_pos"),
        ),
        not_null("prerank_neg_positions", "prerank_pos", "a prerank_neg passed the pre-ranking stage"),
        between(
            "prerank_neg_positions",
            "prerank_pos",
            "prerank_neg are pre-ranked below the pre-ranking cut (> 200)",
            P("prerank_neg_min_pos"),
        ),
        between(
            "exposed_positions", "rank_pos", "exposed items come from the ranking top", 1, P("rank_keep")
        ),
        *_per_request(),
    ]
    return _suite("ranking_log", "ranking", ex, "RANKING_LOG")


def fullflow_suite() -> dict[str, Any]:
    """The eval log: a sample of requests logged with every retrieved candidate."""
    ex = [
        *_schema_part(),
        *_key_columns("fullflow"),
        unique_together("rows", ["request_id", "item_id"], "key: (request_id, item_id) is unique"),
        between(
            "day",
            "requests",
            "enough full-flow requests for the gate's paired statistics (validation.fullflow_min_requests)",
            P("fullflow_min_requests"),
        ),
        between(
            "day",
            "clicks",
            "the full-flow log has clicks (validation.fullflow_min_clicks): without them nothing ranks",
            P("fullflow_min_clicks"),
        ),
        in_set("rows", "in_exposure_log", "every full-flow request is in the day's exposure log", [True]),
        *_labels(("click",)),
        in_set("rows", "click_unexposed", "only exposed candidates are clicked", [False]),
        *_item_side("rows"),
    ]
    return _suite("fullflow_log", "fullflow", ex, "FULLFLOW_LOG")


def landing_suite() -> dict[str, Any]:
    """The day's folder: exactly the contract's files. A late or extra file fails the day (it may
    hold part of the day's logs); the producer merges it into the contract files or removes it."""
    why = (
        "the landing folder holds only exposure/ranking/fullflow.parquet (and _SUCCESS): "
        "a late or extra file is part of no log and is never ignored silently"
    )
    return {
        "name": "landing",
        "expectations": [in_set("files", "known", why, [True])],
        "meta": {"table": "landing", "generated_by": "hap.data.suites"},
    }


def training_set_suite() -> dict[str, Any]:
    sources_in = "source in {}".format
    ex = [
        *_schema_part(),
        expectation(
            "expect_table_row_count_to_be_between", "rows", "the training set is not empty", min_value=1
        ),
        *_key_columns("training_set"),
        unique_together(
            "rows",
            ["dt", "request_id", "item_id", "source"],
            "key: (dt, request_id, item_id, source) is unique",
        ),
        in_set("rows", "source", "known source", list(schema.SOURCES)),
        in_set("rows", "group", "known group", sorted(set(schema.GROUP_OF_SOURCE.values()))),
        in_set("rows", "difficulty", "known difficulty", [d.value for d in schema.Difficulty]),
        in_set("rows", "label", "labels are 0/1", [0, 1]),
        in_set("rows", "label", "positives are labelled 1", [1], **where('source=="expose_pos"')),
        in_set("rows", "label", "negatives are labelled 0", [0], **where('source!="expose_pos"')),
        in_set(
            "rows",
            "difficulty",
            "hard sources sit in the hard partition",
            ["hard"],
            **where(sources_in(list(schema.HARD_SOURCES))),
        ),
        in_set(
            "rows",
            "difficulty",
            "easy sources sit in the easy partition",
            ["easy"],
            **where(sources_in(list(schema.EASY_SOURCES))),
        ),
        in_set(
            "rows", "partition_matches", "the Hive partition folder matches the difficulty column", [True]
        ),
        between(
            "rows",
            "rank_pos",
            "rank_neg are ranked below the ranking cut",
            P("rank_neg_min_pos"),
            **where('source=="rank_neg"'),
        ),
        between(
            "rows",
            "prerank_pos",
            "prerank_neg are pre-ranked below the pre-ranking cut",
            P("prerank_neg_min_pos"),
            **where('source=="prerank_neg"'),
        ),
    ]
    return _suite("training_set", "training_set", ex, "TRAINING_SET")


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

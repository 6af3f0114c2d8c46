"""Data contracts: every table's pyarrow schema and the sample-source enums, defined once.

The simulator, the RecFlow adapter, ingest, validation, the split, the dataset and the tests
all import from here. Raw logs land per day as::

    landing/dt=D/exposure.parquet   one row per exposed item, with the request-side features
    landing/dt=D/ranking.parquet    one row per logged candidate, with the item-side features
    landing/dt=D/fullflow.parquet   every retrieved candidate of a sample of requests (eval)

Ingest joins them per request into the lake (``lake/samples/dt=D``, ``lake/fullflow/dt=D``).
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa


class Source(StrEnum):
    """Where a training sample comes from."""

    EXPOSE_POS = "expose_pos"
    EXPOSE_NEG = "expose_neg"
    RANK_NEG = "rank_neg"
    PRERANK_NEG = "prerank_neg"
    GLOBAL_NEG = "global_neg"


class RankingSource(StrEnum):
    """The ``source`` column of the raw ranking log: exposures are split by click at ingest."""

    EXPOSED = "exposed"
    RANK_NEG = "rank_neg"
    PRERANK_NEG = "prerank_neg"
    GLOBAL_NEG = "global_neg"


class Difficulty(StrEnum):
    """Partition key of the training set. Positives are their own partition."""

    POSITIVE = "positive"
    HARD = "hard"
    EASY = "easy"


SOURCES: tuple[str, ...] = tuple(s.value for s in Source)
NEGATIVE_SOURCES: tuple[str, ...] = tuple(s.value for s in Source if s is not Source.EXPOSE_POS)
HARD_SOURCES: tuple[str, ...] = (Source.EXPOSE_NEG.value, Source.RANK_NEG.value)
EASY_SOURCES: tuple[str, ...] = (Source.PRERANK_NEG.value, Source.GLOBAL_NEG.value)
RANKING_SOURCES: tuple[str, ...] = tuple(s.value for s in RankingSource)

DIFFICULTY_OF_SOURCE: dict[str, str] = {
    Source.EXPOSE_POS.value: Difficulty.POSITIVE.value,
    **{s: Difficulty.HARD.value for s in HARD_SOURCES},
    **{s: Difficulty.EASY.value for s in EASY_SOURCES},
}
# The GHCL group a sample is contrasted in: a negative's own source; positives join every group.
GROUP_OF_SOURCE: dict[str, str] = {s: ("positive" if s == Source.EXPOSE_POS.value else s) for s in SOURCES}
GROUPS: tuple[str, ...] = NEGATIVE_SOURCES

# ---- the 29 anonymized feature columns (ToutiaoRec-style) ------------------------------
USER_CATEGORICAL = ("u_id", "u_age", "u_gender", "u_city", "u_device")
USER_DENSE = ("u_activity", "u_ctr")
USER_SEQUENCE = "u_click_seq"  # recent clicked item ids (hashed like i_id), fixed length, 0 = pad
CONTEXT_CATEGORICAL = ("c_hour", "c_weekday", "c_network", "c_os", "c_channel")
ITEM_CATEGORICAL = (
    "i_id",
    "i_author",
    "i_content_type",
    "i_category",
    "i_subcategory",
    "i_tag",
    "i_language",
    "i_resolution",
)
ITEM_DENSE = (
    "i_age_hours",
    "i_duration",
    "i_ctr",
    "i_popularity",
    "i_quality",
    "i_followers",
    "i_title_len",
    "i_cover_score",
)

REQUEST_FEATURES: tuple[str, ...] = (*USER_CATEGORICAL, *USER_DENSE, USER_SEQUENCE, *CONTEXT_CATEGORICAL)
ITEM_FEATURES: tuple[str, ...] = (*ITEM_CATEGORICAL, *ITEM_DENSE)
FEATURE_COLUMNS: tuple[str, ...] = (*REQUEST_FEATURES, *ITEM_FEATURES)
CATEGORICAL_FEATURES: tuple[str, ...] = (*USER_CATEGORICAL, *CONTEXT_CATEGORICAL, *ITEM_CATEGORICAL)
DENSE_FEATURES: tuple[str, ...] = (*USER_DENSE, *ITEM_DENSE)
assert len(FEATURE_COLUMNS) == 29, "ToutiaoRec has 29 feature columns"


def _feature_fields(names: tuple[str, ...]) -> list[pa.Field]:
    fields = []
    for name in names:
        if name == USER_SEQUENCE:
            fields.append(pa.field(name, pa.list_(pa.int32()), nullable=False))
        elif name in DENSE_FEATURES:
            fields.append(pa.field(name, pa.float32(), nullable=False))
        else:
            fields.append(pa.field(name, pa.int32(), nullable=False))
    return fields


TIMESTAMP = pa.timestamp("ms", tz="UTC")
POSITION = pa.int32()

# The Arrow type of every column that is not a feature: a column has one type in every table.
COLUMN_TYPES: dict[str, pa.DataType] = {
    "dt": pa.string(),  # the day, YYYY-MM-DD
    "request_id": pa.int64(),
    "timestamp": TIMESTAMP,
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "source": pa.string(),  # RankingSource in the ranking log, Source from the lake on
    "group": pa.string(),  # GROUP_OF_SOURCE
    "difficulty": pa.string(),  # Difficulty; also the training set's partition key
    "label": pa.int8(),  # the click, as a training label
    "position": POSITION,  # display position, 1-based
    "retrieval_pos": POSITION,  # stage positions, 1-based; null where the item never got there
    "prerank_pos": POSITION,
    "rank_pos": POSITION,
    "exposed": pa.bool_(),
    "click": pa.int8(),
    "like": pa.int8(),
    "comment": pa.int8(),
    "share": pa.int8(),
    "dwell": pa.float32(),  # seconds
    "content_type": pa.int8(),
    "true_affinity": pa.float32(),  # simulator ground truth; null on real data
}


def _table(columns: str, features: tuple[str, ...]) -> pa.Schema:
    """A table's schema: its columns in order (a name ending in ``?`` is nullable, the others are
    not), then its feature columns."""
    fields = []
    for column in columns.split():
        name = column.removesuffix("?")
        fields.append(pa.field(name, COLUMN_TYPES[name], nullable=column.endswith("?")))
    return pa.schema([*fields, *_feature_fields(features)])


# ---- raw logs ---------------------------------------------------------------------------
EXPOSURE_LOG = _table(
    "request_id timestamp user_id item_id position content_type click like comment share dwell",
    REQUEST_FEATURES,
)
RANKING_LOG = _table(
    "request_id item_id source retrieval_pos? prerank_pos? rank_pos? content_type true_affinity?",
    ITEM_FEATURES,
)
FULLFLOW_LOG = _table(
    "request_id item_id retrieval_pos prerank_pos? rank_pos? exposed click content_type true_affinity?",
    ITEM_FEATURES,
)

RAW_LOGS: dict[str, pa.Schema] = {"exposure": EXPOSURE_LOG, "ranking": RANKING_LOG, "fullflow": FULLFLOW_LOG}

# ---- lake (joined per request) ------------------------------------------------------------
LAKE_SAMPLES = _table(
    "request_id timestamp user_id item_id source label position? retrieval_pos? prerank_pos? rank_pos? "
    "content_type true_affinity?",
    FEATURE_COLUMNS,
)
LAKE_FULLFLOW = _table(
    "request_id timestamp user_id item_id label exposed retrieval_pos prerank_pos? rank_pos? "
    "content_type true_affinity?",
    FEATURE_COLUMNS,
)

# ---- training set and full-flow eval set --------------------------------------------------
TRAINING_SET = _table(
    "dt request_id item_id source group difficulty label retrieval_pos? prerank_pos? rank_pos? content_type",
    FEATURE_COLUMNS,
)
EVAL_SET = _table(
    "dt request_id item_id label exposed retrieval_pos prerank_pos? rank_pos? content_type true_affinity?",
    FEATURE_COLUMNS,
)

TABLES: dict[str, pa.Schema] = {
    **RAW_LOGS,
    "lake_samples": LAKE_SAMPLES,
    "lake_fullflow": LAKE_FULLFLOW,
    "training_set": TRAINING_SET,
    "eval_set": EVAL_SET,
}

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

# ---- raw logs ---------------------------------------------------------------------------
EXPOSURE_LOG = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("timestamp", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("position", POSITION, nullable=False),  # display position, 1-based
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("click", pa.int8(), nullable=False),
        pa.field("like", pa.int8(), nullable=False),
        pa.field("comment", pa.int8(), nullable=False),
        pa.field("share", pa.int8(), nullable=False),
        pa.field("dwell", pa.float32(), nullable=False),  # seconds
        *_feature_fields(REQUEST_FEATURES),
    ]
)

RANKING_LOG = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # RankingSource
        pa.field("retrieval_pos", POSITION),  # null where the item never got there
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("true_affinity", pa.float32()),  # simulator ground truth; null on real data
        *_feature_fields(ITEM_FEATURES),
    ]
)

FULLFLOW_LOG = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("retrieval_pos", POSITION, nullable=False),
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("exposed", pa.bool_(), nullable=False),
        pa.field("click", pa.int8(), nullable=False),
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("true_affinity", pa.float32()),
        *_feature_fields(ITEM_FEATURES),
    ]
)

RAW_LOGS: dict[str, pa.Schema] = {"exposure": EXPOSURE_LOG, "ranking": RANKING_LOG, "fullflow": FULLFLOW_LOG}

# ---- lake (joined per request) ------------------------------------------------------------
_REQUEST_KEYS = [
    pa.field("request_id", pa.int64(), nullable=False),
    pa.field("timestamp", TIMESTAMP, nullable=False),
    pa.field("user_id", pa.int64(), nullable=False),
]

LAKE_SAMPLES = pa.schema(
    [
        *_REQUEST_KEYS,
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # Source
        pa.field("label", pa.int8(), nullable=False),  # click
        pa.field("position", POSITION),  # display position for exposures
        pa.field("retrieval_pos", POSITION),
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("true_affinity", pa.float32()),
        *_feature_fields(FEATURE_COLUMNS),
    ]
)

LAKE_FULLFLOW = pa.schema(
    [
        *_REQUEST_KEYS,
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("exposed", pa.bool_(), nullable=False),
        pa.field("retrieval_pos", POSITION, nullable=False),
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("true_affinity", pa.float32()),
        *_feature_fields(FEATURE_COLUMNS),
    ]
)

# ---- training set and full-flow eval set --------------------------------------------------
TRAINING_SET = pa.schema(
    [
        pa.field("dt", pa.string(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # GROUP_OF_SOURCE
        pa.field("difficulty", pa.string(), nullable=False),  # Difficulty; also the partition key
        pa.field("label", pa.int8(), nullable=False),
        pa.field("retrieval_pos", POSITION),
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("content_type", pa.int8(), nullable=False),
        *_feature_fields(FEATURE_COLUMNS),
    ]
)

EVAL_SET = pa.schema(
    [
        pa.field("dt", pa.string(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("exposed", pa.bool_(), nullable=False),
        pa.field("retrieval_pos", POSITION, nullable=False),
        pa.field("prerank_pos", POSITION),
        pa.field("rank_pos", POSITION),
        pa.field("content_type", pa.int8(), nullable=False),
        pa.field("true_affinity", pa.float32()),  # simulator ground truth; null on real data
        *_feature_fields(FEATURE_COLUMNS),
    ]
)

TABLES: dict[str, pa.Schema] = {
    **RAW_LOGS,
    "lake_samples": LAKE_SAMPLES,
    "lake_fullflow": LAKE_FULLFLOW,
    "training_set": TRAINING_SET,
    "eval_set": EVAL_SET,
}

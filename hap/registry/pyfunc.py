"""The registered model ``hap-prerank``: one MLflow pyfunc holding both towers and the router.

The version's artifacts are the whole bundle folder written by ``hap train`` (light and
expressive weights, ``bundle.json`` with the routing config and calibrated threshold). Loading
goes through ``hap.model.serving.load_bundle``, so the registry serves exactly the DAMR scorer that
``hap evaluate`` measured. Input: one row per candidate with ``request_id``, ``item_id``,
``retrieval_pos`` (its position in the retrieval stage's list) and the 29 feature columns; rows of
several requests may be mixed. Output, in input order: the final
DAMR score (the order's sort key), the served probability ``prob`` (P(click | exposed), the
calibrated score ``hap evaluate`` measures), the light score (NaN under ``routing.serve:
expressive_all``, which does not run the light tower), the expressive score (NaN where not
routed), the routing decision and the final rank within the request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa

from hap.core import schema

BUNDLE_ARTIFACT = "bundle"
# retrieval_pos: the candidate's position in the retrieval stage's list, as a pre-ranker receives it
# (the ``retrieval`` cross feature reads it, hap.model.cross)
INPUT_COLUMNS: tuple[str, ...] = ("request_id", "item_id", "retrieval_pos", *schema.FEATURE_COLUMNS)
OUTPUT_COLUMNS: tuple[str, ...] = (
    "request_id",
    "item_id",
    "score",
    "prob",
    "light_score",
    "expressive_score",
    "routed",
    "rank",
)


# the served columns in the eval set's types (nullable: a cast only converts types)
SERVED_SCHEMA = pa.schema([schema.EVAL_SET.field(name).with_nullable(True) for name in INPUT_COLUMNS])


def to_contract_table(frame: pd.DataFrame) -> pa.Table:
    """Served input as Arrow in the eval set's types: one cast per column (JSON widens int32 to
    int64, a float column may arrive as integers, the click sequence as lists of Python ints), no
    per-row Python. A value the contract cannot hold (an id beyond int32) fails the cast."""
    names = [c for c in INPUT_COLUMNS if c in frame.columns]
    table = pa.Table.from_pandas(frame[names].reset_index(drop=True), preserve_index=False)
    return table.cast(pa.schema([SERVED_SCHEMA.field(n) for n in names]))


def serving_example(frame: pd.DataFrame) -> pd.DataFrame:
    """Integers as int64, floats as float64 and the sequence as int64 lists: the widths a JSON
    payload decodes to, so a client of the served model passes the logged signature.
    ``score_frame`` narrows back to the contract types itself (``to_contract_table``)."""
    frame = frame.reset_index(drop=True).copy()
    for column in frame.columns:
        if pd.api.types.is_integer_dtype(frame[column]):
            frame[column] = frame[column].astype(np.int64)
        elif pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].astype(np.float64)
    frame[schema.USER_SEQUENCE] = [np.asarray(seq, np.int64) for seq in frame[schema.USER_SEQUENCE]]
    return frame


def score_frame(bundle: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """Score every request in ``frame`` through DAMR; one output row per input row, same order."""
    table = to_contract_table(frame)
    result = bundle.score_table(table)
    return pd.DataFrame(
        {
            "request_id": table["request_id"].to_numpy().astype(np.int64),
            "item_id": table["item_id"].to_numpy().astype(np.int64),
            "score": np.asarray(result.final, np.float64),
            "prob": np.asarray(result.prob, np.float64),
            "light_score": np.asarray(result.light, np.float64),
            "expressive_score": np.asarray(result.expressive, np.float64),
            "routed": np.asarray(result.routed, bool),
            "rank": np.asarray(result.rank, np.int64),
        }
    )


class HapPrerankModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``load_context`` loads the bundle, ``predict`` scores candidates."""

    def load_context(self, context) -> None:  # noqa: ANN001 (mlflow's PythonModelContext)
        self.load(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def load(self, bundle_dir: Path) -> HapPrerankModel:
        import torch

        from hap.model.serving import load_bundle

        self._bundle = load_bundle(Path(bundle_dir), device="cuda" if torch.cuda.is_available() else "cpu")
        return self

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (untyped: keep our signature)
        return score_frame(self._bundle, pd.DataFrame(model_input))

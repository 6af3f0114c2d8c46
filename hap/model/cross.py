"""User x item cross features, computed at scoring time from the request and the candidate (COLD,
InteractRank): one vector per (request, candidate) that the light and expressive heads read.

A two-tower head sees the user and the item only through ``[u + v, u * v]`` of two learned
vectors; with hashed ids and a few thousand clicks a window, it never learned that a candidate
sharing the category of the user's recent clicks is a likely click (bench/results/model_quality.md).
These features state that match directly:

- ``seq_match``: ``log1p`` of how many of the request's recent clicks share the candidate's
  category (a click's category from the window's item table: the click sequence holds ids only);
- ``user_logged``: ``log1p(100 x)`` of the user's share ``x`` of logged candidates (what the
  cascade chose for them: exposures, ``rank_neg``, ``prerank_neg``) in the candidate's category,
  over the profile's days;
- ``user_clicked``: the same of the user's share of clicks in the candidate's category;
- ``segment_ctr``: ``log`` of the user segment x category click rate over the base rate, smoothed;
- ``retrieval``: what the stage before the pre-ranker said about the candidate, as a real
  pre-ranker receives it: ``-log`` of its retrieval position (the true affinity falls about
  linearly in it, bench/results/model_quality.md), and a missing indicator. Retrieval's error is
  independent of the pre-ranker's, so the model's estimate and retrieval's combine. Global
  negatives passed through no stage and carry no position: they read 0 and indicator 1 (a value
  imputed without the flag would teach the model that any position can be a random item); every
  candidate served or evaluated has a position, so the indicator is 0 there. Two columns.

The profile is ``hap.data.user_history``'s point-in-time table: a training row of day ``a`` reads the
profile ``as_of`` ``a`` (earlier days only); evaluation and serving read ``serve_as_of`` (the eval
day), which the bundle carries in its ``profile/`` folder. Everything here is numpy over the rows:
training, evaluation and serving call the same ``CrossFeatures.encode``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hap.core import schema
from hap.core.errors import HapError
from hap.data import user_history

CROSS_FEATURES: tuple[str, ...] = ("seq_match", "user_logged", "user_clicked", "segment_ctr", "retrieval")
WIDTHS: dict[str, int] = {"retrieval": 2}  # columns a feature takes (1 unless listed)
PROFILE_FEATURES: tuple[str, ...] = ("user_logged", "user_clicked", "segment_ctr")  # read the profile
RETRIEVAL_COLUMN = "retrieval_pos"
SMOOTHING = 20.0  # pseudo-exposures at the base rate in segment_ctr
SHARE_SCALE = 100.0  # a profile share s enters as log1p(100 s): 0..4.6, the scale of the other inputs
_SHIFT = 24  # pair key = a << _SHIFT | b (hashed ids lie below contract.hash_buckets <= 2^24)


def cross_width(names: list[str] | tuple[str, ...]) -> int:
    """Columns the cross features ``names`` take in the head's input."""
    return sum(WIDTHS.get(n, 1) for n in names)


def retrieval_columns(table: pa.Table) -> np.ndarray:
    """``[rows, 2]``: ``-log(retrieval_pos)`` and whether the position is missing (null or 0)."""
    if table.schema.get_field_index(RETRIEVAL_COLUMN) < 0:
        raise HapError(
            f"model.cross_features 'retrieval' reads the candidates' {RETRIEVAL_COLUMN} column, which the "
            f"input does not carry (columns: {table.column_names[:8]}...)"
        )
    pos = pc.fill_null(table[RETRIEVAL_COLUMN], 0).to_numpy(zero_copy_only=False).astype(np.float64)
    missing = pos <= 0
    return np.stack([np.where(missing, 0.0, -np.log(np.maximum(pos, 1.0))), missing.astype(np.float64)], 1)


def sequence_matrix(column: pa.ChunkedArray | pa.Array, seq_len: int) -> np.ndarray:
    """List column -> ``[N, seq_len]`` int64, keeping the last ``seq_len`` ids, left-padded with 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(lengths)
    out = np.zeros((n, seq_len), dtype=np.int64)
    if flat.size == 0:
        return out
    ends = np.cumsum(lengths)
    starts = ends - lengths
    take = np.minimum(lengths, seq_len)
    # position j of the output row takes flat[ends - take + (j - (seq_len - take))] when j >= seq_len - take
    j = np.arange(seq_len)[None, :]
    first = (seq_len - take)[:, None]
    src = (ends - take)[:, None] + (j - first)
    ok = j >= first
    out[ok] = flat[np.clip(src, 0, flat.size - 1)][ok]
    del starts
    return out


def profile_folder(training_set: Path) -> Path:
    """The profile the split wrote next to the training set ``training/dt=D/train``."""
    return Path(training_set).parent / "profile"


def pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.int64) << _SHIFT) | np.asarray(b, np.int64)


@dataclass
class _Lookup:
    """Sorted int64 keys -> float values; absent keys read ``default``."""

    keys: np.ndarray
    values: np.ndarray

    def get(self, keys: np.ndarray, default: float = 0.0) -> np.ndarray:
        if len(self.keys) == 0:
            return np.full(len(keys), default, np.float64)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.values[pos], default)

    @classmethod
    def of(cls, keys: np.ndarray, values: np.ndarray) -> _Lookup:
        order = np.argsort(keys, kind="stable")
        return cls(np.asarray(keys)[order], np.asarray(values, np.float64)[order])


@dataclass
class _AsOf:
    """One day's profile as lookups."""

    user_logged: _Lookup  # (u_id, category) -> share of the user's logged candidates
    user_clicked: _Lookup  # (u_id, category) -> share of the user's clicks
    segment_ctr: _Lookup  # (u_city, category) -> log smoothed CTR / base rate


@dataclass
class CrossFeatures:
    """The configured cross features of rows, from the item table and the per-day profiles."""

    names: tuple[str, ...]
    items: _Lookup = field(default_factory=lambda: _Lookup(np.zeros(0, np.int64), np.zeros(0)))
    days: dict[str, _AsOf] = field(default_factory=dict)
    serve_as_of: str | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in CROSS_FEATURES]
        if unknown:
            raise HapError(f"model.cross_features: unknown {unknown}; known: {list(CROSS_FEATURES)}")

    @property
    def width(self) -> int:
        return cross_width(self.names)

    def offsets(self) -> dict[str, int]:
        """First column of each feature in the encoded matrix."""
        return dict(zip(self.names, self._offsets))

    @property
    def _offsets(self) -> list[int]:
        starts, at = [], 0
        for name in self.names:
            starts.append(at)
            at += WIDTHS.get(name, 1)
        return starts

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, names: list[str] | tuple[str, ...], folder: Path | None) -> CrossFeatures:
        """From a ``hap.data.user_history`` folder (the split's, or a bundle's copy)."""
        names = tuple(names)
        if not set(names) & set(PROFILE_FEATURES + ("seq_match",)):
            return cls(names)
        if folder is None or not (Path(folder) / user_history.META_FILE).exists():
            raise HapError(
                f"model.cross_features {list(names)} need the split's user-history profile, not found at "
                f"{folder}; run `hap split` again"
            )
        folder = Path(folder)
        meta = user_history.read_meta(folder)
        items = pq.read_table(folder / user_history.ITEMS_FILE)
        out = cls(
            names,
            _Lookup.of(items["i_id"].to_numpy(), items["i_category"].to_numpy()),
            serve_as_of=meta["serve_as_of"],
            folder=folder,
        )
        users = pq.read_table(folder / user_history.USERS_FILE)
        segments = pq.read_table(folder / user_history.SEGMENTS_FILE)
        for day in sorted(set(users["as_of"].to_pylist()) | set(segments["as_of"].to_pylist())):
            out.days[day] = _day(users, segments, day)
        return out

    @classmethod
    def from_table(cls, names: list[str] | tuple[str, ...], table: pa.Table) -> CrossFeatures:
        """Without a profile (tests, benchmarks on an in-memory table): the item table from the
        table's own rows; the profile features read 0."""
        ids, cats = table["i_id"].to_numpy(), table["i_category"].to_numpy()
        uniq, first = np.unique(ids, return_index=True)
        return cls(tuple(names), _Lookup.of(uniq, cats[first]))

    def save(self, folder: Path) -> None:
        """Copy the profile into a bundle folder (``profile/``), so serving reads what training read."""
        if self.folder is not None and self.names:
            shutil.copytree(self.folder, Path(folder) / "profile")

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(
        self, table: pa.Table, seq_len: int, requests: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """``[rows, width]`` float32 for rows that carry the request and the candidate columns.

        ``requests``: (each row's request, the requests' click matrix ``[requests, seq_len]`` as
        ``sequence_matrix`` reads it): the sequences are then read once per request, not once per
        row (the serving path: rows of a request share its sequence, as its user side does), and
        ``table`` needs no sequence."""
        n = table.num_rows
        out = np.zeros((n, self.width), np.float32)
        if not self.names or n == 0:
            return out
        cat = table["i_category"].to_numpy(zero_copy_only=False).astype(np.int64)
        for j, name in zip(self._offsets, self.names):
            if name == "seq_match":
                if requests is None:
                    requests = (None, sequence_matrix(table[schema.USER_SEQUENCE], seq_len))
                out[:, j] = np.log1p(self._seq_match(requests, cat))
            elif name == "retrieval":
                out[:, j : j + 2] = retrieval_columns(table)
        at = dict(zip(self.names, self._offsets))
        profile = [name for name in self.names if name in PROFILE_FEATURES]
        if not profile or not self.days:
            return out
        user_ids = table["u_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        segments = table["u_city"].to_numpy(zero_copy_only=False).astype(np.int64)
        for day, rows in self._rows_by_day(table).items():
            p = self.days.get(day)
            if p is None:
                continue
            every = rows is None  # one day for every row: columns, not row-by-row copies
            day_cat = cat if every else cat[rows]
            keys = {
                "user": pair_key(user_ids if every else user_ids[rows], day_cat),
                "segment": pair_key(segments if every else segments[rows], day_cat),
            }
            for name in profile:
                value = getattr(p, name).get(keys["segment" if name == "segment_ctr" else "user"])
                value = value if name == "segment_ctr" else np.log1p(SHARE_SCALE * value)
                if every:
                    out[:, at[name]] = value
                else:
                    out[rows, at[name]] = value
        return out

    def _seq_match(self, requests: tuple[np.ndarray | None, np.ndarray], cat: np.ndarray) -> np.ndarray:
        """Per row, how many clicks of its sequence share its category; ``requests``: (each row's
        sequence row, or None where every row has its own; the click matrix)."""
        row_seq, seq = requests
        seq_cat = self.items.get(seq.reshape(-1), default=-1).reshape(seq.shape)
        seq_cat = np.where(seq == 0, -1, seq_cat)
        if row_seq is None:
            return (seq_cat == cat[:, None]).sum(1).astype(np.float64)
        # once per request: its sequence's count of each category (-1: padding, unknown), then one
        # lookup per row: the counts the comparison above gives (categories shifted by one, >= 0)
        owner = np.repeat(np.arange(len(seq_cat)), seq_cat.shape[1])
        keys, counts = np.unique(pair_key(owner, seq_cat.reshape(-1) + 1), return_counts=True)
        return _Lookup(keys, counts.astype(np.float64)).get(pair_key(row_seq, cat + 1))

    def _rows_by_day(self, table: pa.Table) -> dict[str, np.ndarray | None]:
        """Rows per profile day: the row's ``dt`` where the profile has that day, else
        ``serve_as_of``; None stands for every row (one day: a request, a day's eval set)."""
        serve = self.serve_as_of or ""
        if table.schema.get_field_index("dt") < 0 or table.num_rows == 0:
            return {serve: None}
        dt = table["dt"]
        if dt.null_count == 0 and pc.all(pc.equal(dt, dt[0])).as_py():  # one day: no per-row grouping
            day = str(dt[0].as_py())
            return {day if day in self.days else serve: None}
        # the distinct days as text once, not every row's (a column holds a day or a few)
        coded = pc.dictionary_encode(dt).combine_chunks()
        if coded.null_count:  # a null day reads as the text "None", as numpy writes it
            labels = np.asarray(dt.to_numpy(zero_copy_only=False)).astype(str)
            codes = np.arange(len(labels))
        else:
            labels = np.asarray(coded.dictionary.to_numpy(zero_copy_only=False)).astype(str)
            codes = coded.indices.to_numpy(zero_copy_only=False)
        days, group = np.unique(
            np.where(np.isin(labels, list(self.days)), labels, serve), return_inverse=True
        )
        group = group.reshape(-1)[codes]
        return {d: np.flatnonzero(group == i) for i, d in enumerate(days)}


def _day(users: pa.Table, segments: pa.Table, day: str) -> _AsOf:
    u = users.filter(pc.equal(users["as_of"], day))
    uid, ucat = u["u_id"].to_numpy(), u["i_category"].to_numpy()
    logged, clicked = u["logged"].to_numpy().astype(np.float64), u["clicked"].to_numpy().astype(np.float64)
    inv = np.unique(uid, return_inverse=True)[1]
    tot_logged, tot_clicked = np.bincount(inv, logged), np.bincount(inv, clicked)
    key = pair_key(uid, ucat)
    s = segments.filter(pc.equal(segments["as_of"], day))
    exposed, sclicked = s["exposed"].to_numpy().astype(np.float64), s["clicked"].to_numpy().astype(np.float64)
    base = max(sclicked.sum() / max(exposed.sum(), 1.0), 1e-6)
    ctr = (sclicked + SMOOTHING * base) / (exposed + SMOOTHING)
    return _AsOf(
        user_logged=_Lookup.of(key, logged / np.maximum(tot_logged[inv], 1.0)),
        user_clicked=_Lookup.of(key, clicked / np.maximum(tot_clicked[inv], 1.0)),
        segment_ctr=_Lookup.of(
            pair_key(s["u_city"].to_numpy(), s["i_category"].to_numpy()), np.log(ctr / base)
        ),
    )

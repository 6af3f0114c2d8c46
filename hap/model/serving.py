"""The one scoring path: the model bundle, its item cache, one batch scorer and one routing mask.

Serving (``score_request``), the MLflow pyfunc, offline evaluation and monitoring all score
through ``HapBundle.score_table`` (the DAMR result of many requests at once) or
``HapBundle.tower_scores`` (one tower's score of every row), so no scoring rule is written twice:

- the lean path: a call's inputs (``Inputs``) are encoded once, in columns, and shared by both
  towers: the request side once per request (its first row), the cross features (the click
  sequences read once per request) and the item features once per row, on first use; each
  tower's user side runs once per request; the item side per row (from the item cache when one
  is built); the head in passes of ``CHUNK_ROWS`` rows in grid order (by request, then column),
  where the expressive attention is one batched matmul of the pass's queries, laid on a
  ``[requests, candidates]`` grid, against each request's own keys and values (no per-candidate
  copy of them), and the MLP runs on the rows alone; everything under ``torch.inference_mode``;
- the light tower runs only where it is served or routes: not under ``expressive_all`` (its
  ``light`` field is then NaN) unless evaluation asks for it (``with_light``);
- the routing mask is ``routing.route_grid`` over a padded ``[requests, candidates]`` grid;
- the final order is ``routing.merge_scores`` under ``routing.merge``;
- the served score, P(click | exposed), is ``calibration.served_probability`` of the same logits.

A bundle folder (``hap train`` output) is ``bundle.json`` + ``light.pt`` / ``expressive.pt``;
``load_bundle`` rebuilds typed model and routing configs from ``bundle.json`` alone (like
nanoGPT's ``GPT(GPTConfig(**checkpoint["model_args"]))``), so a missing key fails loudly instead
of falling back to a default that disagrees with the params.

Cost (``bench/bench_serving.py``, ``bench/results/serving.md``, ``docs/model.md``): the lean path
returns the old path's scores (to 1e-6), routed sets and ranks (``tests/model/test_lean_serving.py``);
what is left at 1,000 candidates is a few hundred small numpy and torch calls (encoding, six tower
calls, routing, the final order), and at 10,000 the light tower's arithmetic and the per-candidate
feature encoding, which ``expressive_all`` pays too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError

from hap.core import layout, schema
from hap.core.config import Config, ModelConfig, RoutingConfig
from hap.core.errors import HapError
from hap.model.batches import ITEM_CATEGORICAL, FeatureSpec
from hap.model.calibration import fit_calibration, served_probability, validation_exposures
from hap.model.cross import CrossFeatures
from hap.model.export import load_exported
from hap.model.routing import flops_per_request, merge_scores, ranks, route_grid
from hap.model.towers import BUNDLE_FORMAT, ExpressiveModel, LightweightModel, build_models

if TYPE_CHECKING:
    import pyarrow as pa

# rows per item-tower + head pass: bounds memory on a 1M-row eval set, and keeps each pass's
# temporaries in the CPU caches (a 10,000-row pass runs slower per row than three 4,096-row ones)
CHUNK_ROWS = 4096
ITEM_COLUMNS = ["item_id", *ITEM_CATEGORICAL, *schema.ITEM_DENSE]


@dataclass
class RequestScores:
    """One request's (or many requests') DAMR result, in input order."""

    final: np.ndarray  # the score the final order sorts by (routed ones above the rest)
    light: np.ndarray
    expressive: np.ndarray  # NaN where not routed
    routed: np.ndarray  # bool
    rank: np.ndarray  # 1-based final position within the request
    prob: np.ndarray | None = None  # the served score, P(click | exposed): calibration.served_probability


@dataclass(frozen=True)
class ItemCache:
    """Item-tower outputs of a catalogue snapshot, by ``item_id`` (sorted, for a binary search)."""

    ids: np.ndarray  # [N] int64, sorted, unique
    vectors: dict[str, torch.Tensor]  # tower name -> [N, D]

    def lookup(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in ``vectors`` (0 where absent) and whether it is present."""
        pos = np.searchsorted(self.ids, item_ids).clip(max=len(self.ids) - 1)
        hit = self.ids[pos] == item_ids
        return np.where(hit, pos, 0), hit


@dataclass(frozen=True)
class RequestIndex:
    """Rows of many requests laid out on a padded ``[requests, n_max]`` grid."""

    row_request: np.ndarray  # request index of each row
    first_row: np.ndarray  # first row of each request
    column: np.ndarray  # grid column of each row
    counts: np.ndarray  # rows per request

    @classmethod
    def of(cls, request_id: np.ndarray, item_id: np.ndarray | None = None) -> RequestIndex:
        """With ``item_id``, a request's columns follow its item ids, not the rows' order: every
        tie (in routing's cut or the final order) then breaks by item id, so the served order does
        not depend on the order the candidates arrive in."""
        request_id = np.asarray(request_id)
        if len(request_id) and (request_id == request_id[0]).all():  # one request: what serving sees
            uniq, ri = request_id[:1], np.zeros(len(request_id), np.int64)
        else:
            uniq, ri = np.unique(request_id, return_inverse=True)
        if item_id is None:
            order = np.argsort(ri, kind="stable")
        elif len(uniq) == 1:
            order = np.argsort(np.asarray(item_id), kind="stable")  # lexsort's order, one key
        else:
            order = np.lexsort((np.asarray(item_id), ri))
        counts = np.bincount(ri, minlength=len(uniq))
        starts = np.cumsum(counts) - counts
        col = np.empty(len(ri), np.int64)
        col[order] = np.arange(len(ri)) - np.repeat(starts, counts)
        return cls(ri, order[starts], col, counts)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.counts), int(self.counts.max(initial=0))

    def grid(self, values: np.ndarray, fill: Any) -> np.ndarray:
        """``values`` (one per row) on the grid, ``fill`` in the padding."""
        values = np.asarray(values)
        dtype = np.float64 if isinstance(fill, float) else values.dtype
        out = np.full(self.shape, fill, dtype=dtype)
        out[self.row_request, self.column] = values
        return out

    def valid(self) -> np.ndarray:
        return self.grid(np.ones(len(self.row_request), bool), False)


class Inputs:
    """One scoring call's model inputs, each encoded once, in columns, and shared by both towers:
    the request side once per request (its first row, as every row of a request carries the same
    user, context and clicks), the cross features and the item features per row on first use,
    the item-cache positions per row, and each tower's user side once per request."""

    def __init__(self, bundle: HapBundle, table: pa.Table, index: RequestIndex) -> None:
        self.bundle, self.table, self.index = bundle, table, index
        # one row per request (a slice, no copy, where there is one request)
        one = len(index.first_row) == 1
        self.requests = table.slice(int(index.first_row[0]), 1) if one else table.take(index.first_row)
        self.clicks = bundle.spec.clicks(self.requests)  # read once: the user side and the cross features
        self.request = bundle._tensors(bundle.spec.encode_request(self.requests, self.clicks))
        per_row = [c for c in table.column_names if c != schema.USER_SEQUENCE]
        self.per_row = table.select(per_row)  # the rows without their click sequences
        self._users: dict[str, dict[str, torch.Tensor]] = {}
        self._cross = _RowMemo(table.num_rows)
        self._items = _RowMemo(table.num_rows)
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def prepare(self, tower: str, rows: np.ndarray) -> None:
        """Encode what ``tower`` reads of ``rows`` and no row has yet: their cross features, and
        the item features of those the item cache does not hold for it."""
        if self.bundle.spec.cross.width:
            self._cross.fill(rows, self._encode_cross)
        cache = self.bundle.item_cache
        if cache is not None and tower in cache.vectors:
            rows = rows[~self.cached(rows)[1]]
        self._items.fill(rows, self._encode_items)

    def user(self, tower: str) -> dict[str, torch.Tensor]:
        if tower not in self._users:
            r = self.request
            self._users[tower] = self.bundle._towers()[tower].user(r["req_cat"], r["req_dense"], r["seq"])
        return self._users[tower]

    def cross(self, rows: np.ndarray) -> torch.Tensor | None:
        """The rows' user x item cross features (``hap.model.cross``), or None without any."""
        if not self.bundle.spec.cross.width:
            return None
        return self.bundle._tensor(self._cross.get(rows, self._encode_cross)["cross"])

    def items(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The rows' encoded item features (``item_cat``, ``item_dense``)."""
        return {k: self.bundle._tensor(v) for k, v in self._items.get(rows, self._encode_items).items()}

    def _encode_cross(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        seqs = (self.index.row_request[rows], self.clicks)
        return {"cross": self.bundle.spec.encode_cross(_take(self.per_row, rows), seqs)}

    def _encode_items(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.bundle.spec.encode_items(_take(self.table.select(ITEM_COLUMNS), rows))

    def cached(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows' positions in the item cache and whether they are there."""
        if self._cache is None:
            self._cache = self.bundle.item_cache.lookup(self.table["item_id"].to_numpy())
        return self._cache[0][rows], self._cache[1][rows]


class _RowMemo:
    """Per-row arrays encoded on first use: each row once per call, whichever tower asks first."""

    def __init__(self, n: int) -> None:
        self.have = np.zeros(n, bool)
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, rows: np.ndarray, encode: Any) -> dict[str, np.ndarray]:
        self.fill(rows, encode)
        if len(rows) == len(self.have) and _is_every_row(rows):
            return self.arrays
        return {k: v[rows] for k, v in self.arrays.items()}

    def fill(self, rows: np.ndarray, encode: Any) -> None:
        """Encode the rows not encoded yet, in one ``encode`` call."""
        missing = np.sort(rows[~self.have[rows]])  # ascending: every row reads the table as it is
        if len(missing):
            for k, v in encode(missing).items():
                if len(missing) == len(self.have):
                    self.arrays[k] = v
                    continue
                if k not in self.arrays:
                    self.arrays[k] = np.zeros((len(self.have), *v.shape[1:]), v.dtype)
                self.arrays[k][missing] = v
            self.have[missing] = True


def _is_every_row(rows: np.ndarray) -> bool:
    return len(rows) == 0 or (rows[0] == 0 and bool((np.diff(rows) == 1).all()))


def _take(table: pa.Table, rows: np.ndarray) -> pa.Table:
    return table if len(rows) == table.num_rows and _is_every_row(rows) else table.take(rows)


@dataclass(frozen=True)
class HapBundle:
    """Both towers, the feature spec and the typed routing config: the DAMR scorer."""

    meta: dict[str, Any]
    model_config: ModelConfig
    routing: RoutingConfig
    spec: FeatureSpec
    light: LightweightModel | None
    expressive: ExpressiveModel | None
    device: torch.device = torch.device("cpu")
    item_cache: ItemCache | None = None
    # the towers' TorchScript exports (``hap.model.export``), which score in their place where loaded
    exported: dict[str, torch.nn.Module] | None = None

    @property
    def calibration(self) -> dict[str, Any] | None:
        """Platt scaling of each score kind, fitted at training time (``hap.model.calibration``)."""
        return self.meta.get("calibration")

    @property
    def serve(self) -> str:
        """``light`` | ``hap`` | ``expressive_all``: which scorer ``score_table`` runs."""
        return self.routing.serve if self.expressive is not None else "light"

    def with_routing(self, **changes: Any) -> HapBundle:
        """The same weights with other routing settings (rho sweeps, serve mode), validated."""
        routing = RoutingConfig.model_validate({**self.routing.model_dump(), **changes})
        return dataclasses.replace(self, routing=routing)

    @torch.no_grad()
    def cache_items(self, catalogue: Any) -> HapBundle:
        """The same weights with both item towers precomputed for a catalogue snapshot (rows with
        ``item_id`` and the item features; the last row of an id wins). Item features drift (age,
        CTR, popularity), so rebuild it when they refresh: daily here."""
        table = as_table(catalogue)
        ids = table["item_id"].to_numpy()
        unique_ids, last_from_end = np.unique(ids[::-1], return_index=True)  # sorted ids, last rows
        enc = self._tensors(self.spec.encode_items(table.take(len(ids) - 1 - last_from_end)))
        vectors = {
            name: model.item(enc["item_cat"], enc["item_dense"]) for name, model in self._towers().items()
        }
        return dataclasses.replace(self, item_cache=ItemCache(unique_ids, vectors))

    def encode(self, frame: Any) -> dict[str, torch.Tensor]:
        """A pyarrow Table or pandas DataFrame of candidate rows -> model input tensors."""
        return self._tensors(self.spec.encode(as_table(frame)))

    def _towers(self) -> dict[str, torch.nn.Module]:
        """The modules that score: the exported towers where the bundle has them, else the eager ones."""
        eager = {n: m for n, m in (("light", self.light), ("expressive", self.expressive)) if m is not None}
        return {**eager, **(self.exported or {})}

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: self._tensor(v) for k, v in arrays.items()}

    # ---- the batch scorer ---------------------------------------------------------------------------
    @torch.inference_mode()
    def tower_scores(
        self, tower: str, frame: Any, rows: np.ndarray | None = None, index: RequestIndex | None = None
    ) -> np.ndarray:
        """``tower``'s logit for ``rows`` (default all) of ``frame``: the user side once per
        request, the item side (cached ids from the cache) and the head per row."""
        table = as_table(frame)
        index = index or RequestIndex.of(table["request_id"].to_numpy(), table["item_id"].to_numpy())
        rows = np.arange(table.num_rows) if rows is None else np.asarray(rows, np.int64)
        return self._scores(tower, Inputs(self, table, index), rows)

    def _scores(self, tower: str, inputs: Inputs, rows: np.ndarray) -> np.ndarray:
        """``tower``'s logits of ``rows``, in their order, ``CHUNK_ROWS`` rows at a time (in grid
        order, by request then column, where the head attends): a chunk's requests' user side is
        a slice (no per-row copy of it), its attention one batched matmul over its requests."""
        model, index = self._towers()[tower], inputs.index
        user = inputs.user(tower)
        inputs.prepare(tower, rows)  # every row's features in one pass, before the chunks read them
        req = index.row_request[rows]
        order = np.lexsort((index.column[rows], req)) if model.attends else np.arange(len(rows))
        rows_sorted, req_sorted = rows[order], req[order]
        counts = np.bincount(req_sorted, minlength=len(index.counts))
        col = np.arange(len(rows)) - (np.cumsum(counts) - counts)[req_sorted]  # among these rows
        out = np.empty(len(rows), np.float32)
        for s in range(0, len(rows), CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, len(rows))
            part, r = rows_sorted[s:e], req_sorted[s:e]
            r0, r1 = (int(r[0]), int(r[-1]) + 1) if model.attends else (0, len(index.counts))
            # the chunk's first request may have begun in the chunk before
            c = col[s:e] - np.where(r == r0, col[s], 0) if model.attends else col[s:e]
            logits = model.head_rows(
                {k: t[r0:r1] for k, t in user.items()},
                self._item_vectors(tower, inputs, part),
                self._tensor(r - r0),
                self._tensor(c),
                int(c.max()) + 1,
                inputs.cross(part),
            )
            out[order[s:e]] = logits.float().cpu().numpy()
        return out

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _item_vectors(self, tower: str, inputs: Inputs, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), D]`` item-tower outputs: cached ids from the cache, the rest through the tower."""
        model, cache = self._towers()[tower], self.item_cache
        if cache is None or tower not in cache.vectors:
            enc = inputs.items(rows)
            return model.item(enc["item_cat"], enc["item_dense"])
        pos, hit = inputs.cached(rows)
        out = cache.vectors[tower][self._tensor(pos)]
        if not hit.all():
            miss = np.flatnonzero(~hit)
            enc = inputs.items(rows[miss])
            out[self._tensor(miss)] = model.item(enc["item_cat"], enc["item_dense"])
        return out

    # ---- DAMR over many requests ----------------------------------------------------------------
    def routed_mask(self, light: np.ndarray | None, index: RequestIndex) -> np.ndarray:
        """Which rows the expressive model scores, under the bundle's serve mode."""
        n = len(index.row_request)
        if self.serve == "light":
            return np.zeros(n, bool)
        if self.serve == "expressive_all" or light is None:
            return np.ones(n, bool)
        grid = torch.from_numpy(index.grid(light, -np.inf).astype(np.float32))
        mask = route_grid(grid, torch.from_numpy(index.valid()), self.routing).numpy()
        return mask[index.row_request, index.column]

    @torch.inference_mode()
    def score_table(
        self, frame: Any, index: RequestIndex | None = None, *, with_light: bool = False
    ) -> RequestScores:
        """The DAMR result of every row of ``frame`` (rows of several requests may be mixed).

        Under ``expressive_all`` the light tower does not run (its ``light`` field is NaN) unless
        ``with_light``: evaluation asks for it, to measure the light model beside the served one."""
        table = as_table(frame)
        index = index or RequestIndex.of(table["request_id"].to_numpy(), table["item_id"].to_numpy())
        inputs, every = Inputs(self, table, index), np.arange(table.num_rows)
        run_light = self.light is not None and (self.serve != "expressive_all" or with_light)
        light = self._scores("light", inputs, every) if run_light else None
        routed = self.routed_mask(light, index)
        expr = np.full(table.num_rows, np.nan, np.float32)
        if routed.any():
            expr[routed] = self._scores("expressive", inputs, np.flatnonzero(routed))
        if light is None:  # no light tower: its field repeats the expressive score; not run: NaN
            light = np.where(routed & (self.light is None), expr, np.nan).astype(np.float32)
        # expressive_all is the expressive model alone on every candidate (the paper's reference);
        # routing.merge only says how HAP's routed and unrouted candidates meet
        final = (
            expr.astype(np.float64)
            if self.serve == "expressive_all"
            else merge_scores(light, expr, routed, self.routing.merge)
        )
        rank_grid = ranks(index.grid(final, -np.inf))
        prob = served_probability(light, expr, routed, self.serve, self.routing.merge, self.calibration)
        return RequestScores(final, light, expr, routed, rank_grid[index.row_request, index.column], prob)

    def score_request(self, frame: Any) -> RequestScores:
        """The serving path for one request's candidates."""
        return self.score_table(frame)

    def flops_per_request(self, n: int) -> dict[str, float]:
        return flops_per_request(
            self.light, self.expressive, n, self.routing.model_copy(update={"serve": self.serve})
        )


def as_table(frame: Any) -> pa.Table:
    import pyarrow as pa

    return frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)


def _typed(meta_file: Path, meta: dict[str, Any]) -> tuple[ModelConfig, RoutingConfig]:
    try:
        return ModelConfig.model_validate(meta["model"]), RoutingConfig.model_validate(meta["routing"])
    except (KeyError, ValidationError) as err:
        raise HapError(f"{meta_file}: model or routing config is invalid ({err})") from None


def load_bundle(path: Path | str, device: str = "cpu", exported: bool = True) -> HapBundle:
    """Rebuild the scorer from a bundle folder alone (works in a fresh process); it scores through
    the bundle's TorchScript exports where it has them, unless ``exported`` is False (the eager
    towers, which the export test compares against)."""
    folder = Path(path)
    meta_file = folder / layout.BUNDLE_META_FILE
    if not meta_file.exists():
        raise HapError(f"no model bundle at {folder} (bundle.json missing); run `hap train` first")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise HapError(f"{meta_file}: unknown bundle format {meta.get('format')!r}")
    model_config, routing = _typed(meta_file, meta)
    towers = dict(zip(("light", "expressive"), build_models(model_config)))
    for name, model in towers.items():
        if meta.get(f"has_{name}"):
            state = torch.load(
                folder / layout.tower_weights_file(name), map_location="cpu", weights_only=True
            )
            # bundles written before clicks had side features embed them by id alone (an empty lookup)
            state.setdefault("behaviour_lookup", model.behaviour_lookup)
            model.load_state_dict(state)
            model.to(device).eval()
    spec = FeatureSpec.from_dict(meta["features"])
    spec.cross = CrossFeatures.load(model_config.cross_features, folder / "profile")
    return HapBundle(
        meta=meta,
        model_config=model_config,
        routing=routing,
        spec=spec,
        light=towers["light"] if meta.get("has_light") else None,
        expressive=towers["expressive"] if meta.get("has_expressive") else None,
        device=torch.device(device),
        exported=load_exported(folder, [n for n in towers if meta.get(f"has_{n}")], torch.device(device))
        if exported
        else None,
    )


def calibrate_towers(
    cfg: Config, light: Any, expressive: Any, spec: Any, date: Any, device: Any = "cpu"
) -> dict[str, Any] | None:
    """Training's hook: the calibration of freshly trained towers (eval mode) on the window's
    validation exposures (None when the day's training set is not on disk)."""
    if not date:
        return None
    bundle = HapBundle({}, cfg.model, cfg.routing, spec, light, expressive, torch.device(device))
    return fit_calibration(bundle, validation_exposures(cfg, date))

"""The one scoring path: the model bundle, its item cache, one batch scorer and one routing mask.

Serving (``score_request``), the MLflow pyfunc, offline evaluation and monitoring all score
through ``HapBundle.score_table`` (the DAMR result of many requests at once) or
``HapBundle.tower_scores`` (one tower's score of every row), so no scoring rule is written twice:

- the user side runs once per request, the item side per row (from the item cache when one is
  built), the head per row, in chunks that bound memory;
- the routing mask is ``routing.route_grid`` over a padded ``[requests, candidates]`` grid;
- the final order is ``routing.merge_scores`` under ``routing.merge``;
- the served score, P(click | exposed), is ``calibration.served_probability`` of the same logits.

A bundle folder (``hap train`` output) is ``bundle.json`` + ``light.pt`` / ``expressive.pt``;
``load_bundle`` rebuilds typed model and routing configs from ``bundle.json`` alone (like
nanoGPT's ``GPT(GPTConfig(**checkpoint["model_args"]))``), so a missing key fails loudly instead
of falling back to a default that disagrees with the params.
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
from hap.model.routing import flops_per_request, merge_scores, ranks, route_grid
from hap.model.towers import BUNDLE_FORMAT, ExpressiveModel, LightweightModel, build_models

if TYPE_CHECKING:
    import pyarrow as pa

CHUNK_ROWS = 8192  # rows per item-tower + head pass: bounds memory on a 1M-row eval set
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
        uniq, ri = np.unique(request_id, return_inverse=True)
        order = np.argsort(ri, kind="stable") if item_id is None else np.lexsort((np.asarray(item_id), ri))
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
        return {n: m for n, m in (("light", self.light), ("expressive", self.expressive)) if m is not None}

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}

    # ---- the batch scorer ---------------------------------------------------------------------
    @torch.no_grad()
    def tower_scores(
        self, tower: str, frame: Any, rows: np.ndarray | None = None, index: RequestIndex | None = None
    ) -> np.ndarray:
        """``tower``'s logit for ``rows`` (default all) of ``frame``: the user side once per
        request, the item side (cached ids from the cache) and the head per row."""
        table = as_table(frame)
        model = self._towers()[tower]
        index = index or RequestIndex.of(table["request_id"].to_numpy(), table["item_id"].to_numpy())
        req = self._tensors(self.spec.encode_request(table.take(index.first_row)))
        user = model.user(req["req_cat"], req["req_dense"], req["seq"])
        rows = np.arange(table.num_rows) if rows is None else np.asarray(rows, np.int64)
        items = table.select(ITEM_COLUMNS)  # each chunk takes item columns only (not the sequences)
        out = np.empty(len(rows), np.float32)
        for s in range(0, len(rows), CHUNK_ROWS):
            r = rows[s : s + CHUNK_ROWS]
            at = torch.from_numpy(index.row_request[r]).to(self.device)
            u = {k: t[at] for k, t in user.items()}
            cross = self._cross(table, r)
            out[s : s + len(r)] = (
                model.head(u, self._item_vectors(tower, items, r), cross).float().cpu().numpy()
            )
        return out

    def _cross(self, table: pa.Table, rows: np.ndarray) -> torch.Tensor | None:
        """The rows' user x item cross features (``hap.model.cross``), or None without any."""
        if not self.spec.cross.width:
            return None
        return torch.from_numpy(self.spec.encode_cross(table.take(rows))).to(self.device)

    def _item_vectors(self, tower: str, table: pa.Table, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), D]`` item-tower outputs: cached ids from the cache, the rest through the tower."""
        model, cache = self._towers()[tower], self.item_cache
        if cache is None or tower not in cache.vectors:
            enc = self._tensors(self.spec.encode_items(table.take(rows)))
            return model.item(enc["item_cat"], enc["item_dense"])
        pos, hit = cache.lookup(table["item_id"].to_numpy()[rows])
        out = cache.vectors[tower][torch.from_numpy(pos).to(self.device)]
        if not hit.all():
            miss = np.flatnonzero(~hit)
            enc = self._tensors(self.spec.encode_items(table.take(rows[miss])))
            out[torch.from_numpy(miss).to(self.device)] = model.item(enc["item_cat"], enc["item_dense"])
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

    def score_table(self, frame: Any, index: RequestIndex | None = None) -> RequestScores:
        """The DAMR result of every row of ``frame`` (rows of several requests may be mixed)."""
        table = as_table(frame)
        index = index or RequestIndex.of(table["request_id"].to_numpy(), table["item_id"].to_numpy())
        light = self.tower_scores("light", table, index=index) if self.light is not None else None
        routed = self.routed_mask(light, index)
        expr = np.full(table.num_rows, np.nan, np.float32)
        if routed.any():
            expr[routed] = self.tower_scores("expressive", table, np.flatnonzero(routed), index)
        if light is None:
            light = np.where(routed, expr, np.nan).astype(np.float32)
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


def load_bundle(path: Path | str, device: str = "cpu") -> HapBundle:
    """Rebuild the scorer from a bundle folder alone (works in a fresh process)."""
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

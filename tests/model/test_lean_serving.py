"""The lean scoring path gives the scores, routed sets and ranks of the scorer it replaced.

``tests/fixtures/lean_serving`` holds a tiny trained bundle, four eval requests of uneven sizes
(rows interleaved) and what the scorer of commit 623f356 (per-tower encoding, per-candidate
attention copies) returned for them: every serve mode, HAP under top-k and threshold routing and
every merge, without and with a partial item cache (``generate.py`` wrote them with that code).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hap.model import serving
from hap.model.serving import HapBundle, load_bundle

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lean_serving"
FIELDS = ("final", "light", "expressive", "prob", "routed", "rank")
ATOL = 1e-6


def _generator() -> ModuleType:
    """The fixture's own writer: the cases the references were written for come from it."""
    spec = importlib.util.spec_from_file_location("lean_serving_generate", FIXTURE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scenarios = _generator().scenarios


@pytest.fixture(scope="module")
def fixture() -> tuple[HapBundle, HapBundle, object, dict[str, np.ndarray]]:
    bundle = load_bundle(FIXTURE / "bundle")
    table = pq.read_table(FIXTURE / "requests.parquet")
    ref = dict(np.load(FIXTURE / "reference.npz"))
    return bundle, bundle.cache_items(table.slice(0, table.num_rows // 2)), table, ref


def same(name: str, field: str, got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, field)
    if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
        assert (got == want).all(), (name, field, np.flatnonzero(got != want)[:10])
        return
    assert (np.isnan(got) == np.isnan(want)).all(), (name, field)
    ok = ~np.isnan(want)
    worst = float(np.abs(got[ok].astype(np.float64) - want[ok]).max(initial=0.0))
    assert worst <= ATOL, (name, field, worst)


def test_the_fixture_exercises_routing(fixture) -> None:
    """The references are not degenerate: each routing mode routes some candidates, not all, and
    the two modes route different sets (a comparison against them can fail)."""
    *_, ref = fixture
    topk, thr = ref["hap-topk-stack-none/routed"], ref["hap-threshold-stack-none/routed"]
    assert 0 < topk.sum() < len(topk) and 0 < thr.sum() < len(thr) and (topk != thr).any()


@pytest.mark.parametrize("chunk", [None, 64])
def test_every_scenario_scores_ranks_and_routes_as_before(fixture, monkeypatch, chunk) -> None:
    """Also in passes of 64 rows: requests (150 to 300 rows) then span several passes, each
    pass's first request begun in the pass before."""
    bundle, cached, table, ref = fixture
    if chunk:
        monkeypatch.setattr(serving, "CHUNK_ROWS", chunk)
    for name, routing, cache in scenarios(float(ref["threshold"])):
        b = (cached if cache == "partial" else bundle).with_routing(**routing)
        got = b.score_table(table, with_light=True)
        for field in FIELDS:
            same(name, field, getattr(got, field), ref[f"{name}/{field}"])


def test_expressive_all_serves_without_the_light_tower(fixture, monkeypatch) -> None:
    """Serving expressive_all runs the expressive tower alone: its light field is NaN (not
    computed) and every other field is today's."""
    bundle, _, table, ref = fixture
    b = bundle.with_routing(serve="expressive_all")

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the light tower ran while expressive_all was served")

    monkeypatch.setattr(b.light, "forward", refuse)
    monkeypatch.setattr(b.light, "user", refuse)
    monkeypatch.setattr(b.light, "head", refuse)
    got = b.score_table(table)
    assert np.isnan(got.light).all()
    for field in ("final", "expressive", "prob", "routed", "rank"):
        same("expressive_all-none", field, getattr(got, field), ref[f"expressive_all-none/{field}"])


def test_tower_scores_of_all_rows_and_of_a_subset(fixture) -> None:
    bundle, cached, table, ref = fixture
    rows = ref["tower/rows"]
    for tower in ("light", "expressive"):
        same(tower, "all", bundle.tower_scores(tower, table), ref[f"tower/{tower}/all"])
        same(tower, "rows", bundle.tower_scores(tower, table, rows), ref[f"tower/{tower}/rows"])
        same(tower, "cached", cached.tower_scores(tower, table, rows), ref[f"tower/{tower}/cached_rows"])


@pytest.mark.parametrize("cache", ["none", "partial"])
def test_features_are_encoded_once_per_call_and_shared_by_both_towers(fixture, monkeypatch, cache) -> None:
    """Once per call, however many passes the rows take (64 rows a pass here)."""
    bundle, cached, table, _ = fixture
    bundle = cached if cache == "partial" else bundle
    monkeypatch.setattr(serving, "CHUNK_ROWS", 64)
    spec = type(bundle.spec)
    calls = {"encode_request": 0, "encode_cross": 0, "encode_items": 0}
    for method in calls:
        original = getattr(spec, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):  # noqa: ANN001, ANN002, ANN003
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(spec, method, counted)
    bundle.with_routing(serve="hap").score_table(table)
    assert calls == {"encode_request": 1, "encode_cross": 1, "encode_items": 1}


def test_the_scorer_runs_under_inference_mode(fixture, monkeypatch) -> None:
    bundle, _, table, _ = fixture
    seen: list[bool] = []
    original = type(bundle.expressive).head_rows

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append(torch.is_inference_mode_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(bundle.expressive), "head_rows", spy)
    bundle.with_routing(serve="hap").score_table(table)
    assert seen and all(seen)

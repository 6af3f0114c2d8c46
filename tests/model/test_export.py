"""The served artifact: a bundle's TorchScript towers score exactly as its eager ones.

The bundle and requests are ``tests/fixtures/lean_serving``'s (a tiny trained bundle, four eval
requests of uneven sizes, rows interleaved); ``save_bundle`` writes the exports, as ``hap train`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hap.core import layout
from hap.model.serving import HapBundle, load_bundle
from hap.model.towers import save_bundle

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lean_serving"
TOLERANCE = 1e-5
SCORE_FIELDS = ("final", "light", "expressive", "prob")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[HapBundle, HapBundle, object]:
    """The fixture's towers re-saved through ``save_bundle`` (which exports them), loaded both ways."""
    eager = load_bundle(FIXTURE / "bundle", exported=False)
    folder = tmp_path_factory.mktemp("bundle")
    shutil.copytree(FIXTURE / "bundle", folder, dirs_exist_ok=True)
    meta = json.loads((folder / layout.BUNDLE_META_FILE).read_text())
    save_bundle(folder, meta, eager.light, eager.expressive)
    served = load_bundle(folder)
    served.meta["folder"] = folder  # where the torch-only process finds the exports
    return eager, served, pq.read_table(FIXTURE / "requests.parquet")


def test_save_bundle_writes_one_export_per_tower_and_load_bundle_serves_it(bundles) -> None:
    _, served, _ = bundles
    assert served.exported is not None and set(served.exported) == {"light", "expressive"}
    for name, module in served.exported.items():
        assert isinstance(module, torch.jit.ScriptModule), name
        assert served._towers()[name] is module  # the scorer runs the export, not the eager tower


@pytest.mark.parametrize(
    "routing",
    [
        {"serve": "light"},
        {"serve": "hap", "mode": "topk", "rho": 0.1},
        {"serve": "hap", "mode": "topk", "rho": 0.3, "merge": "sum"},
        {"serve": "expressive_all"},
    ],
    ids=lambda r: "-".join(str(v) for v in r.values()),
)
@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "item-cache"])
def test_exported_scores_equal_the_eager_ones(bundles, routing, cache) -> None:
    eager, served, table = bundles
    if cache:  # half the catalogue cached: cached and computed item vectors meet in one call
        catalogue = table.slice(0, table.num_rows // 2)
        eager, served = eager.cache_items(catalogue), served.cache_items(catalogue)
    want = eager.with_routing(**routing).score_table(table, with_light=True)
    got = served.with_routing(**routing).score_table(table, with_light=True)
    for field in SCORE_FIELDS:
        a, b = np.asarray(getattr(got, field), np.float64), np.asarray(getattr(want, field), np.float64)
        assert (np.isnan(a) == np.isnan(b)).all(), field
        assert np.nanmax(np.abs(a - b), initial=0.0) <= TOLERANCE, field
    assert (got.routed == want.routed).all() and (got.rank == want.rank).all()
    assert 1 < len(np.unique(got.final)), "a constant score cannot test an order"


def test_the_export_runs_in_a_process_with_torch_alone(bundles, tmp_path) -> None:
    """A runtime that has torch but not this package loads the exported towers and computes the
    same logits from the encoded inputs (what a C++ ``torch::jit::load`` server would do)."""
    eager, served, table = bundles
    rid = table["request_id"].to_numpy()
    one = table.filter(rid == rid[0])
    enc = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in eager.encode(one).items()}
    torch.save(
        {k: v[:1] if k in ("req_cat", "req_dense", "seq") else v for k, v in enc.items()}, tmp_path / "x.pt"
    )
    script = (
        "import sys, json, torch\n"
        "x = torch.load(sys.argv[2])\n"
        "out = {}\n"
        "for name in ('light', 'expressive'):\n"
        "    m = torch.jit.load(f'{sys.argv[1]}/{name}.torchscript.pt')\n"
        "    with torch.inference_mode():\n"
        "        u = m.user(x['req_cat'], x['req_dense'], x['seq'])\n"
        "        v = m.item(x['item_cat'], x['item_dense'])\n"
        "        n = v.shape[0]\n"
        "        row = (torch.zeros(n, dtype=torch.long), torch.arange(n), n)\n"
        "        out[name] = m.head_rows(u, v, *row, x['cross']).tolist()\n"
        "assert not any(k == 'hap' or k.startswith('hap.') for k in sys.modules)\n"
        "print('OUT ' + json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(served.meta["folder"]), str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("OUT "))[4:])
    for name in ("light", "expressive"):
        want = eager.tower_scores(name, one)
        assert np.abs(np.asarray(got[name]) - want).max() <= TOLERANCE, name


def test_a_bundle_exported_in_another_process_keeps_its_identity(bundles, tmp_path) -> None:
    """The exports' bytes follow the process (``torch.jit.save`` orders constants by Python's
    salted string hash), so they are not part of ``bundle_hash``: the same weights saved by two
    processes are one registered model."""
    from hap.registry.registration import bundle_hash

    _, served, _ = bundles
    folder = Path(served.meta["folder"])
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from hap.model.serving import load_bundle\n"
        "from hap.model.towers import save_bundle\n"
        "folder = Path(sys.argv[1])\n"
        "b = load_bundle(folder, exported=False)\n"
        "meta = json.loads((folder / 'bundle.json').read_text())\n"
        "save_bundle(folder, meta, b.light, b.expressive)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", script, str(again)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bundle_hash(again) == bundle_hash(folder)
    assert load_bundle(again).exported is not None

"""What a trained bundle's score depends on: ``python -m bench.model_probe BUNDLE_DIR TRAINING_DIR``.

``TRAINING_DIR`` is the split's ``training/dt=D`` (its ``train/``, ``eval/`` and ``profile/``).
Prints, for the light model on the full-flow eval set (bench/results/model_quality.md):

- ``gt_recall@50`` as is, with every click sequence blanked, with every user id set to one value,
  and with the cross features zeroed (when the bundle has any): an input the score ignores moves
  nothing;
- the score's rise inside a request from candidates with 0 to k recent clicks in their category
  (k = 1..5; the true affinity's rise next to it);
- on one training batch: the gradient norm of the GHCL loss on each part of the model (the click
  sequence's embedding rows, the rest of the table, the user tower, the item tower, the head) and
  each group's loss.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hap.core.config import load_config
from hap.model.cross import CrossFeatures
from hap.model.evaluate import load_eval_set, ranker_vectors
from hap.model.serving import load_bundle


def _gt50(cfg, es, key) -> float:  # noqa: ANN001
    return float(np.nanmean(ranker_vectors(cfg, es, key)["gt_recall@50"]))


def ablations(cfg, bundle, es) -> dict[str, float]:  # noqa: ANN001
    t = es.table
    out = {"as_is": _gt50(cfg, es, bundle.tower_scores("light", t, index=es.index).astype(np.float64))}
    seq = t.column("u_click_seq")
    blank = pa.array([[0] * cfg.model.seq_len] * t.num_rows, seq.type)
    variants = {
        "seq_blanked": t.set_column(t.schema.get_field_index("u_click_seq"), "u_click_seq", blank),
        "user_id_constant": t.set_column(
            t.schema.get_field_index("u_id"), "u_id", pa.array(np.ones(t.num_rows, np.int64))
        ),
    }
    for name, table in variants.items():
        out[name] = _gt50(cfg, es, bundle.tower_scores("light", table, index=es.index).astype(np.float64))
    if bundle.spec.cross.width:
        none = dataclasses.replace(bundle.spec, cross=CrossFeatures(()))
        b = dataclasses.replace(bundle, spec=none)
        out["cross_zeroed"] = _gt50(cfg, es, b.tower_scores("light", t, index=es.index).astype(np.float64))
    return out


def slope(cfg, bundle, es, folder: Path) -> dict[str, float]:  # noqa: ANN001
    match = CrossFeatures.load(["seq_match"], folder / "profile").encode(es.table, cfg.model.seq_len)[:, 0]
    k = np.rint(np.expm1(match)).astype(int)
    light = bundle.tower_scores("light", es.table, index=es.index).astype(np.float64)
    truth = es.column("true_affinity").astype(np.float64)
    req = es.index.row_request
    out = {}
    for value, name in ((light, "score"), (truth, "truth")):
        base = np.bincount(req, value * (k == 0), len(es.index.counts)) / np.maximum(
            np.bincount(req, k == 0, len(es.index.counts)), 1
        )
        for j in (1, 3, 5):
            m = k == j
            if m.any():
                out[f"{name}_rise_{j}"] = float(np.mean(value[m] - base[req[m]]))
    return out


def gradients(cfg, bundle, folder: Path) -> dict[str, float]:  # noqa: ANN001
    from hap.model.losses import group_losses
    from hap.model.stream import StreamingTrainData

    data = StreamingTrainData(cfg, folder / "train", spec=bundle.spec)
    b = next(iter(data.load(0, "train").iter_batches(0)))
    model = bundle.light
    model.train()
    logits = model(b.req_cat, b.req_dense, b.seq, b.item_cat, b.item_dense, b.cross)
    losses, present = group_losses(logits, b.valid, b.col_group, cfg.train.temperature, cfg.train.bce_weight)
    (losses * present).sum().backward()
    g = model.emb.weight.grad
    seq_rows = torch.unique(b.seq[b.seq != 0])
    out = {f"loss/{i}": float(v) for i, v in enumerate(losses)}
    mask = torch.zeros(len(g), dtype=torch.bool)
    mask[seq_rows] = True
    out["grad/emb_seq_rows"] = float(g[mask].norm())
    out["grad/emb_other_rows"] = float(g[~mask].norm())
    for part in ("user_tower", "item_tower", "mlp", "out", "wide"):
        mod = getattr(model, part, None)
        if mod is not None:
            out[f"grad/{part}"] = float(torch.cat([p.grad.reshape(-1) for p in mod.parameters()]).norm())
    model.eval()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("training")
    args = ap.parse_args()
    cfg = load_config()
    folder = Path(args.training)
    bundle = load_bundle(args.bundle)
    es = load_eval_set(folder / "eval")
    n = pc.count_distinct(es.table["request_id"]).as_py()
    print(f"eval requests: {n}")
    for name, fn in (
        ("ablations", lambda: ablations(cfg, bundle, es)),
        ("slope", lambda: slope(cfg, bundle, es, folder)),
        ("gradients", lambda: gradients(cfg, bundle, folder)),
    ):
        print(name, {k: round(v, 4) for k, v in fn().items()})


if __name__ == "__main__":
    main()

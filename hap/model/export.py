"""The served artifact: each tower's scoring methods exported as TorchScript beside its weights.

A bundle carries ``light.torchscript.pt`` / ``expressive.torchscript.pt`` (``layout.tower_export_file``)
next to the state dicts. Each holds the tower's ``user``, ``item`` and ``head_rows`` methods, the three
calls the scoring path makes (``hap.model.serving``), so a runtime without this package's Python
(``torch::jit::load`` in C++, or any Python process with torch alone) runs the same arithmetic;
``load_bundle`` serves through them wherever they exist, so evaluation, the pyfunc, the endpoint and
monitoring all score with the artifact that ships.

Why TorchScript and not ONNX (measured on one request, ``docs/model.md``): the scripted towers
return the eager scores bit for bit and need nothing but torch; ONNX Runtime ran the light tower's
arithmetic faster at 1,000 candidates (0.39 against 0.61 ms) but not at 10,000, needs one graph per
call shape and a second runtime, and the arithmetic is a third of a request's time
(``bench/results/serving.md`` times the export against the eager towers).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from hap.core import layout
from hap.core.errors import HapError


def export_towers(folder: Path, towers: dict[str, nn.Module]) -> None:
    """Script each tower (a CPU copy in eval mode) and save it into the bundle ``folder``."""
    for name, model in towers.items():
        scripted = torch.jit.script(copy.deepcopy(model).cpu().eval())
        torch.jit.save(scripted, str(Path(folder) / layout.tower_export_file(name)))


def load_exported(folder: Path, names: list[str], device: torch.device) -> dict[str, nn.Module] | None:
    """The exported towers ``names`` of a bundle, or None where any is missing (a bundle written
    before exports existed is served by its eager towers)."""
    files = {name: Path(folder) / layout.tower_export_file(name) for name in names}
    if not files or not all(f.exists() for f in files.values()):
        return None
    try:
        return {name: torch.jit.load(str(f), map_location=device).eval() for name, f in files.items()}
    except RuntimeError as err:
        raise HapError(f"{folder}: exported tower cannot be loaded ({str(err).splitlines()[0]})") from None

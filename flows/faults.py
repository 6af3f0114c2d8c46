"""Fault injection, to prove that retries work on real task runs.

``HAP_INJECT_FAULTS="ingest:1,register:2"`` makes the first N attempts of a step raise
``OSError`` (a transient fault). Attempts are counted in a file under the data root, so the
count survives retries in other processes and each data root starts fresh. Unset in production.
"""

from __future__ import annotations

import os

from hap.core.config import Config

ENV = "HAP_INJECT_FAULTS"


def _budget(step: str) -> int:
    for item in os.environ.get(ENV, "").split(","):
        name, _, count = item.strip().partition(":")
        if name == step:
            return int(count or 1)
    return 0


def maybe_inject(cfg: Config, step: str) -> None:
    """Raise ``OSError`` while the step's injected fault budget is not spent."""
    budget = _budget(step)
    if budget <= 0:
        return
    counter = cfg.home / ".faults" / step
    counter.parent.mkdir(parents=True, exist_ok=True)
    seen = int(counter.read_text()) if counter.exists() else 0
    if seen < budget:
        counter.write_text(str(seen + 1))
        raise OSError(f"injected transient fault in '{step}' (attempt {seen + 1} of {budget} failing)")

"""Scoped changes to this process's environment.

Some libraries write their settings into ``os.environ`` as a side effect (MLflow's
``set_tracking_uri``, a Dask nanny before it spawns its workers), and tests export variables for
a fixture's lifetime. Left in place, such a value outlives its purpose and reaches every later
step and child process; ``restored`` scopes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def restored(names: Iterable[str]) -> Iterator[None]:
    """Put the variables ``names`` back as they were (set to their value, or unset) on the way out."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

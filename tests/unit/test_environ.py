"""``hap.core.environ.restored``: what a library writes into the environment does not outlive its scope."""

from __future__ import annotations

import os

import pytest

from hap.core import environ


def test_restored_puts_set_variables_back_and_unsets_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAP_TEST_KEPT", "before")
    monkeypatch.delenv("HAP_TEST_NEW", raising=False)
    monkeypatch.setenv("HAP_TEST_OTHER", "before")
    with pytest.raises(RuntimeError), environ.restored(["HAP_TEST_KEPT", "HAP_TEST_NEW"]):
        os.environ.update(HAP_TEST_KEPT="during", HAP_TEST_NEW="during", HAP_TEST_OTHER="during")
        raise RuntimeError("the scope fails: the variables come back all the same")
    assert os.environ["HAP_TEST_KEPT"] == "before"
    assert "HAP_TEST_NEW" not in os.environ
    assert os.environ["HAP_TEST_OTHER"] == "during"  # not named: left as the scope set it

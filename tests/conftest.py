"""Test-wide fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Tests that pin torch's thread count (to time, or to match the machine) do not leak it: float32
    reductions sum in another order with another count, and a fixture comparison after such a test saw
    gradients 4e-4 apart (relative) where it expected 1e-4 when run alone."""
    torch = sys.modules.get("torch")  # not imported yet: nothing to restore to
    threads = torch.get_num_threads() if torch else None
    yield
    if torch and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

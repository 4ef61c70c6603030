"""`train-head --compile`: the trunk's training forward compiled in place (abawfeat/utils/compiling.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from worlds import World, build_world, config

from abawfeat.train import fit
from abawfeat.trunks import build_trunk
from abawfeat.utils import progress
from abawfeat.utils.compiling import compile_training_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_MAMBA = {"hidden": 8, "layers": 1, "heads": 2, "state": 4, "chunk": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    said: list[str] = []
    monkeypatch.setattr(progress, "loud_warning", said.append)
    return said


def test_compiled_mamba_trains_like_the_eager_one_and_keeps_its_state_dict(warnings: list[str]) -> None:
    torch.manual_seed(0)
    eager = build_trunk("mamba", 6, TINY_MAMBA)
    compiled = build_trunk("mamba", 6, TINY_MAMBA)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    wrapper = compile_training_forward(compiled)
    x = torch.randn(3, 10, 6)
    ya, yb = eager(x), compiled(x)
    (ya**2).sum().backward()
    (yb**2).sum().backward()
    assert not wrapper.failed and not warnings, "the compiled path fell back to eager: it was not tested"
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert list(compiled.state_dict()) == keys  # checkpoints load into an eager trunk unchanged

    # Without gradients (validation, prediction) the eager forward runs: bit-identical, never compiled.
    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a no-grad call went through the compiled function")

    wrapper.compiled = no_compiling
    with torch.no_grad():
        assert torch.equal(compiled(x), eager(x))


def test_fit_with_compile_records_it_and_learns_what_eager_learns(world: World, tmp_path: Path,
                                                                  warnings: list[str]) -> None:
    eager = fit(config(world, tmp_path / "eager", epochs=2))
    compiled = fit(config(world, tmp_path / "compiled", epochs=2, compile=True))
    again = fit(config(world, tmp_path / "again", epochs=2, compile=True))
    assert not warnings
    assert again.metrics == compiled.metrics  # compiled runs reproduce each other exactly
    record = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert record["train"]["compile"] is True
    assert json.loads((tmp_path / "eager" / "config.json").read_text())["train"]["compile"] is False
    for key in ("ccc_valence", "ccc_arousal"):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], abs=1e-4)


def test_a_failing_compiler_trains_eagerly_after_one_warning(world: World, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            warnings: list[str]) -> None:
    def broken_compile(fn: Any, **_: Any) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail

    eager = fit(config(world, tmp_path / "eager", epochs=2))
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = fit(config(world, tmp_path / "fallback", epochs=2, compile=True))
    assert len(warnings) == 1
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training eagerly" in warnings[0]
    assert "leaving out --compile" in warnings[0]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(fallback.history) == strip(eager.history)  # the eager computation, exactly
    assert fallback.metrics == eager.metrics

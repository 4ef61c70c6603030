"""The selective state-space trunk: its chunked parallel scan equals the recurrence computed one frame after
another, its causal outputs never see later frames, and on a world whose labels depend on an event tens of
frames back it learns what a frame-wise head cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worlds import World, build_world, config

from abawfeat.errors import ConfigError
from abawfeat.train import fit
from abawfeat.trunks import build_trunk
from abawfeat.trunks.mamba import scan_reference, selective_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("length, chunk", [(1, 16), (5, 16), (16, 16), (37, 8), (64, 16), (100, 7)])
def test_the_parallel_scan_equals_the_step_by_step_recurrence(length: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(length * 100 + chunk)
    b, heads, p, n = 2, 3, 4, 5
    kw = {"dtype": torch.float64, "generator": g}
    u = torch.randn(b, length, heads, p, **kw)
    delta = torch.rand(b, length, heads, **kw) * 2.0
    delta[:, ::7] = 0.0  # steps of zero (padded frames) hold the state
    a = -torch.rand(heads, **kw) * 4.0 - 0.01
    bb, cc = torch.randn(b, length, n, **kw), torch.randn(b, length, n, **kw)
    fast = selective_scan(u, delta, a, bb, cc, chunk)
    slow = scan_reference(u, delta, a, bb, cc)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # Gradients too (the scan is what training differentiates through).
    ins = [t.clone().requires_grad_(True) for t in (u, delta, bb, cc)]
    ins2 = [t.clone().requires_grad_(True) for t in (u, delta, bb, cc)]
    w = torch.randn(fast.shape, **kw)
    (selective_scan(ins[0], ins[1], a, ins[2], ins[3], chunk) * w).sum().backward()
    (scan_reference(ins2[0], ins2[1], a, ins2[2], ins2[3]) * w).sum().backward()
    for x, y in zip(ins, ins2, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9)


def test_a_long_window_with_strong_decay_stays_finite() -> None:
    u = torch.randn(1, 2000, 2, 3)
    delta = torch.full((1, 2000, 2), 50.0)  # decays of exp(-800) per step: underflow, never overflow
    b, c = torch.randn(1, 2000, 4), torch.randn(1, 2000, 4)
    y = selective_scan(u, delta, torch.tensor([-16.0, -1.0]), b, c)
    assert torch.isfinite(y).all()


def test_chunk_size_does_not_change_the_trunk_outputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 50, 12)
    small = build_trunk("mamba", 12, {"hidden": 16, "chunk": 4}).eval()
    large = build_trunk("mamba", 12, {"hidden": 16, "chunk": 64}).eval()
    large.load_state_dict(small.state_dict())
    torch.testing.assert_close(small(x), large(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_causal_output_at_t_never_depends_on_later_frames(bidirectional: bool) -> None:
    torch.manual_seed(1)
    trunk = build_trunk("mamba", 6, {"hidden": 16, "layers": 2, "bidirectional": bidirectional}).eval()
    x = torch.randn(1, 40, 6)
    y = x.clone()
    y[0, 25:] = torch.randn(15, 6) * 10  # everything after frame 24 changes
    a, b = trunk(x), trunk(y)
    if bidirectional:
        assert (a[0, :25] - b[0, :25]).abs().max() > 1e-3  # the backward scan reads later frames
        assert trunk.context().kind == "bidirectional"
    else:
        torch.testing.assert_close(a[0, :25], b[0, :25], rtol=0, atol=0)
        assert (a[0, 25:] - b[0, 25:]).abs().max() > 1e-3
        assert trunk.context().kind == "causal" and trunk.context().receptive_field is None


def test_bad_options_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="not divisible by heads"):
        build_trunk("mamba", 8, {"hidden": 10, "heads": 3})
    with pytest.raises(ConfigError, match="state=0"):
        build_trunk("mamba", 8, {"state": 0})


@pytest.fixture(scope="module")
def event_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("events"), temporal=True, events=True, noise=0.05, n_train=24,
                       n_val=3, n_test=1, n_frames=200, dim=8)


def test_mamba_learns_a_dependency_tens_of_frames_back_that_fc_cannot(event_world: World,
                                                                       tmp_path: Path) -> None:
    fc = fit(config(event_world, tmp_path / "fc", task="va", head="fc", epochs=6)).metrics["ccc_va"]
    mamba = fit(config(event_world, tmp_path / "mamba", task="va", head="mamba", window=64, batch_size=16,
                       epochs=12, lr=1e-2, hidden=16)).metrics["ccc_va"]
    assert fc < 0.3  # the label sits on a frame 15-45 frames back: the current frame does not show it
    assert mamba > fc + 0.5, (mamba, fc)

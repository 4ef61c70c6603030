"""Every registered head, through one parametrised set of tests: shapes, masking, checkpoint round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from abawfeat.errors import ConfigError
from abawfeat.heads import (
    OUTPUT_DIMS,
    Head,
    HeadConfig,
    build_head,
    describe_heads,
    head_class,
    head_from_dict,
    head_to_dict,
    list_heads,
    register_head,
)
from abawfeat.train import load_run, save_checkpoint

D = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def variants() -> list[tuple[str, dict]]:
    """Each registered head with its defaults, plus its temporal / bidirectional variants if it has them."""
    out = []
    for name in list_heads():
        fields = {f.name for f in dataclasses.fields(head_class(name).Config)}
        out.append((name, {}))
        if "trunk" in fields:
            out.append((name, {"trunk": "lstm", "bidirectional": True, "hidden": 8}))
        elif "bidirectional" in fields:
            out.append((name, {"bidirectional": True, "layers": 2, "hidden": 8}))
    return out


VARIANTS = variants()
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in VARIANTS]


def make(name: str, options: dict) -> Head:
    torch.manual_seed(0)
    fields = {f.name for f in dataclasses.fields(head_class(name).Config)}
    kw = dict(options, in_dim=D)
    if "embed_dim" in fields:
        kw["embed_dim"] = 6
    head = build_head(name, **kw)
    if hasattr(head, "set_text_embeddings"):
        head.set_text_embeddings(torch.randn(8, 6))
    head.set_feature_stats(torch.randn(D), torch.rand(D) + 0.5)
    return head.eval()


def test_registry_lists_the_papers_heads() -> None:
    assert {"fc", "lstm", "contrastive", "mtl"} <= set(list_heads())
    assert {row["name"] for row in describe_heads()} == set(list_heads())
    with pytest.raises(ConfigError, match="unknown head"):
        build_head("transformer-xl")
    with pytest.raises(ConfigError, match="no option"):
        build_head("fc", in_dim=D, hiddden=3)


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        register_head("fc")(type("Again", (Head,), {"Config": HeadConfig}))


@pytest.mark.parametrize("name, options", VARIANTS, ids=IDS)
def test_shapes(name: str, options: dict) -> None:
    head = make(name, options)
    out = head(torch.randn(3, 9, D), torch.ones(3, 9, dtype=torch.bool))
    assert set(head.tasks) <= set(out)
    for task in head.tasks:
        assert out[task].shape == (3, 9, OUTPUT_DIMS[task])
    if "va" in out:
        assert out["va"].abs().max() <= 1.0  # squashed into the labels' range
    # Fewer frames than a window, a single frame, fp16 inputs as stored in the cache: all fine.
    assert head(torch.randn(1, 1, D).half(), None)[head.tasks[0]].shape[:2] == (1, 1)
    with pytest.raises(ConfigError, match="features"):
        head(torch.randn(2, 4, D + 1), None)


@pytest.mark.parametrize("name, options", VARIANTS, ids=IDS)
def test_padding_is_zero_and_never_leaks_into_real_frames(name: str, options: dict) -> None:
    head = make(name, options)
    x = torch.randn(3, 10, D)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 1:] = False
    out = head(x, mask)
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn(int((~mask).sum()), D)  # garbage in the padding
    out2 = head(x2, mask)
    for task in head.tasks:
        assert torch.all(out[task][~mask] == 0)
        # A bidirectional LSTM that ran over the padding would change the last real frames here.
        torch.testing.assert_close(out[task][mask], out2[task][mask], rtol=1e-5, atol=1e-5)
    # A padded sequence gives what the same frames give alone, without padding.
    alone = head(x[:1, :6], None)
    for task in head.tasks:
        torch.testing.assert_close(out[task][0, :6], alone[task][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, options", VARIANTS, ids=IDS)
def test_config_and_weights_round_trip_through_a_checkpoint(name: str, options: dict, tmp_path: Path) -> None:
    head = make(name, options)
    for p in head.parameters():  # not the initial weights: a rebuilt head must get the trained ones
        p.data.add_(0.1 * torch.randn_like(p))
    fingerprint = {"encoder": "fake", "feature_dim": D}
    save_checkpoint(tmp_path / "checkpoint.pt", head, fingerprint, None, epoch=3)
    run = load_run(tmp_path)
    assert run.head.name == name
    assert run.head.config == head.config
    assert run.fingerprint == fingerprint and run.best_epoch == 3
    x = torch.randn(2, 5, D)
    a, b = head(x, None), run.head(x, None)
    for task in head.tasks:
        torch.testing.assert_close(a[task], b[task], rtol=0, atol=0)
    assert head_from_dict(head_to_dict(head)).config == head.config


def test_lstm_refuses_a_mask_with_holes() -> None:
    head = make("lstm", {})
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        head(torch.randn(1, 5, D), mask)

"""Every registered trunk under every head kind, through one parametrised set of tests: shapes, masking,
declared context, checkpoint round trip; and the trunks' context declarations themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.heads import HEADS, Head, build_head, describe_heads, head_from_dict, head_to_dict, upgrade_v1
from abawfeat.tasks import single, task_names
from abawfeat.train.rundir import load_checkpoint, save_checkpoint
from abawfeat.trunks import TRUNKS, Context, build_trunk, describe_trunks, trunk_fields

D = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(name: str, **extra: object) -> dict:
    """A trunk's options at test size: narrow, and bidirectional where the trunk can be."""
    fields = trunk_fields(name)
    options = {k: v for k, v in {"hidden": 8, "layers": 2}.items() if k in fields}
    options.update({k: v for k, v in extra.items() if k in fields})
    return options


# (head kind, tasks, trunk, trunk options): every trunk with its defaults and at test size (bidirectional
# where it has the option), under every head kind: per-task outputs (single-task and multi-task), the
# mixture of experts (multi-task) and the contrastive head; a new head kind joins as per-task outputs.
VARIANTS = []
for _trunk in TRUNKS.names():
    for _kind in HEADS.names():
        if _kind == "contrastive":
            VARIANTS.append(("contrastive", ("expr",), _trunk, small(_trunk)))
            continue
        if _kind == "tasks":
            VARIANTS.append(("tasks", ("va",), _trunk, {}))
        VARIANTS.append((_kind, task_names("mtl"), _trunk, small(_trunk, bidirectional=True)))
IDS = [f"{kind}-{'+'.join(tasks)}-{trunk}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
       for kind, tasks, trunk, o in VARIANTS]


def make(kind: str, tasks: tuple[str, ...], trunk: str, options: dict) -> Head:
    torch.manual_seed(0)
    fields: dict = {"in_dim": D, "trunk": trunk, "trunk_config": options}
    if kind == "contrastive":
        fields["embed_dim"] = 6
    else:
        fields["tasks"] = tasks
    head = build_head(kind, **fields)
    if hasattr(head, "set_text_embeddings"):
        head.set_text_embeddings(torch.randn(8, 6))
    head.set_feature_stats(torch.randn(D), torch.rand(D) + 0.5)
    return head.eval()


def test_registries_list_the_papers_trunks_and_head_kinds() -> None:
    assert {"fc", "lstm", "gru"} <= set(TRUNKS.names())
    assert {"tasks", "contrastive", "moe"} == set(HEADS.names())
    assert {row["name"] for row in describe_heads()} == set(HEADS.names())
    assert {row["name"] for row in describe_trunks()} == set(TRUNKS.names())
    with pytest.raises(ConfigError, match="unknown head"):
        build_head("transformer-xl")
    with pytest.raises(ConfigError, match="unknown trunk"):
        build_head("tasks", in_dim=D, trunk="transformer-xl")
    with pytest.raises(ConfigError, match="no option hiddden"):
        build_head("tasks", in_dim=D, trunk="fc", trunk_config={"hiddden": 3})


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        TRUNKS.register("fc")(type("Again", (TRUNKS.get("lstm"),), {}))
    with pytest.raises(TypeError):
        TRUNKS.register("not-a-trunk")(object)  # type: ignore[arg-type]
    assert "not-a-trunk" not in TRUNKS


@pytest.mark.parametrize("kind, tasks, trunk, options", VARIANTS, ids=IDS)
def test_shapes(kind: str, tasks: tuple[str, ...], trunk: str, options: dict) -> None:
    head = make(kind, tasks, trunk, options)
    out = head(torch.randn(3, 9, D), torch.ones(3, 9, dtype=torch.bool))
    assert set(head.tasks) <= set(out)
    for t in head.tasks:
        assert out[t].shape == (3, 9, single(t).width)
    if "va" in out:
        assert out["va"].abs().max() <= 1.0  # squashed into the labels' range
    # Fewer frames than a window, a single frame, fp16 inputs as stored in the cache: all fine.
    assert head(torch.randn(1, 1, D).half(), None)[head.tasks[0]].shape[:2] == (1, 1)
    with pytest.raises(ConfigError, match="features"):
        head(torch.randn(2, 4, D + 1), None)


@pytest.mark.parametrize("kind, tasks, trunk, options", VARIANTS, ids=IDS)
def test_padding_is_zero_and_never_leaks_into_real_frames(
    kind: str, tasks: tuple[str, ...], trunk: str, options: dict
) -> None:
    head = make(kind, tasks, trunk, options)
    x = torch.randn(3, 10, D)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 1:] = False
    out = head(x, mask)
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn(int((~mask).sum()), D)  # garbage in the padding
    out2 = head(x2, mask)
    for t in head.tasks:
        assert torch.all(out[t][~mask] == 0)
        # A bidirectional trunk that ran over the padding would change the last real frames here.
        torch.testing.assert_close(out[t][mask], out2[t][mask], rtol=1e-5, atol=1e-5)
    # A padded sequence gives what the same frames give alone, without padding.
    alone = head(x[:1, :6], None)
    for t in head.tasks:
        torch.testing.assert_close(out[t][0, :6], alone[t][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, tasks, trunk, options", VARIANTS, ids=IDS)
def test_outputs_depend_only_on_the_declared_context(
    kind: str, tasks: tuple[str, ...], trunk: str, options: dict
) -> None:
    """Changing frame j changes outputs only where the declared context can see it: nowhere else for a
    frame-wise trunk, at and after j for a causal one, within the receptive field when it is finite."""
    head = make(kind, tasks, trunk, options)
    context = head.context()
    t_len, j = 24, 12
    x = torch.randn(1, t_len, D)
    y = x.clone()
    y[0, j] += 3.0
    a, b = head(x, None), head(y, None)
    changed = np.zeros(t_len, dtype=bool)
    for t in head.tasks:
        changed |= ((a[t] - b[t]).abs().amax(dim=-1)[0] > 1e-6).numpy()
    back, ahead = context.reach()
    pos = np.arange(t_len)
    allowed = (pos >= j - ahead) & (pos <= j + back)
    assert changed[j]
    assert not (changed & ~allowed).any(), f"{context.describe()}: changed at {np.flatnonzero(changed)}"


@pytest.mark.parametrize("kind, tasks, trunk, options", VARIANTS, ids=IDS)
def test_config_and_weights_round_trip_through_a_checkpoint(
    kind: str, tasks: tuple[str, ...], trunk: str, options: dict, tmp_path: Path
) -> None:
    head = make(kind, tasks, trunk, options)
    for p in head.parameters():  # not the initial weights: a rebuilt head must get the trained ones
        p.data.add_(0.1 * torch.randn_like(p))
    fingerprint = {"encoder": "fake", "feature_dim": D}
    save_checkpoint(tmp_path / "checkpoint.pt", head, [fingerprint], None, epoch=3)
    loaded, payload = load_checkpoint(tmp_path / "checkpoint.pt", head.tasks)
    assert loaded.name == kind
    assert loaded.config == head.config
    assert payload["fingerprints"] == [fingerprint] and payload["epoch"] == 3
    x = torch.randn(2, 5, D)
    a, b = head(x, None), loaded(x, None)
    for t in head.tasks:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=0)
    assert head_from_dict(head_to_dict(head)).config == head.config
    with pytest.raises(CheckpointError, match="another run"):
        load_checkpoint(tmp_path / "checkpoint.pt", ("au",) if head.tasks != ("au",) else ("va",))


def test_recurrent_trunks_refuse_a_mask_with_holes() -> None:
    for name in ("lstm", "gru"):
        trunk = build_trunk(name, D, {"hidden": 4})
        mask = torch.ones(1, 5, dtype=torch.bool)
        mask[0, 2] = False
        with pytest.raises(ValueError, match="prefix"):
            trunk(torch.randn(1, 5, D), mask)


# ------------------------------------------------------------------------------------------- contexts


@pytest.mark.parametrize("context, length, weights", [
    (Context("frame"), 4, None),
    (Context("causal"), 4, [1, 2, 3, 4]),  # a forward LSTM at position p has seen p + 1 frames
    (Context("bidirectional"), 5, [1, 2, 3, 2, 1]),  # limited by the nearer window edge
    (Context("causal", receptive_field=3), 6, [1, 2, 3, 3, 3, 3]),  # full once the field is
    (Context("bidirectional", receptive_field=5), 7, [1, 2, 3, 3, 3, 2, 1]),  # two frames each side
])
def test_position_weights_follow_the_declared_context(
    context: Context, length: int, weights: list | None
) -> None:
    got = context.position_weights(length)
    if weights is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, weights)


def test_version_1_checkpoints_load_as_todays_heads(tmp_path: Path) -> None:
    """Checkpoints written before trunks were split from heads (one head per architecture) still load."""
    old = {"name": "lstm", "config": {"in_dim": D, "tasks": ["au"], "dropout": 0.0, "normalize": True,
                                      "hidden": 6, "layers": 1, "bidirectional": True}}
    head = build_head("tasks", in_dim=D, tasks=("au",), trunk="lstm",
                      trunk_config={"hidden": 6, "layers": 1, "bidirectional": True})
    state = {k.replace("trunk.rnn.", "trunk.lstm.", 1): v for k, v in head.state_dict().items()}
    torch.save({"format": "abawfeat-head", "version": 1, "head": old, "state_dict": state,
                "fingerprint": {"encoder": "ddamfn"}, "epoch": 2, "au_thresholds": None},
               tmp_path / "checkpoint.pt")
    loaded, payload = load_checkpoint(tmp_path / "checkpoint.pt", ("au",))
    assert loaded.config == head.config and payload["fingerprints"] == [{"encoder": "ddamfn"}]
    x = torch.randn(1, 4, D)
    torch.testing.assert_close(loaded(x, None)["au"], head.eval()(x, None)["au"], rtol=0, atol=0)
    converted, _ = upgrade_v1({"name": "contrastive", "config": {"trunk": "fc", "hidden": 0}}, {})
    assert converted["config"]["trunk_config"]["hidden"] == 512  # the paper's FC 512 default of version 1


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_cpu_attention_equals_pytorchs_kernel(causal: bool) -> None:
    """The written-out attention used on CPU gives PyTorch's fused kernel's outputs and gradients, with a
    causal mask or with padded keys (bidirectional windows that end early)."""
    from torch.nn import functional as F

    from abawfeat.trunks.transformer import _attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 8, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([10, 6, 1])
    keys = None if causal else (torch.arange(10)[None, :] < lengths[:, None])[:, None, None, :]
    ours = _attention(q, k, v, keys, causal, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, is_causal=causal and keys is None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((ours * ref.detach()).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * ref.detach()).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

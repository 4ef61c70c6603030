"""The mixture-of-experts head: its gate and load-balance term against hand formulas, the term in the loss
at the weight the run records, and in history.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from worlds import World, build_world, config

from abawfeat.data.batches import Batch
from abawfeat.errors import ConfigError
from abawfeat.heads import build_head
from abawfeat.heads.moe import BALANCE_KEY, MixtureOfExperts
from abawfeat.train import fit
from abawfeat.train.objectives import build_objective

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")]


def test_the_output_is_the_gate_weighted_sum_of_the_experts_and_the_balance_is_switchs() -> None:
    torch.manual_seed(0)
    mix = MixtureOfExperts(6, 3, experts=4, hidden=5)
    h = torch.randn(2, 7, 6)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out, balance = mix(h, mask)
    gates = torch.softmax(mix.gate(h), dim=-1)
    up = torch.nn.functional.gelu(mix.up(h)).view(2, 7, 4, 5)
    each = torch.stack([up[..., k, :] @ mix.down[k] + mix.down_bias[k] for k in range(4)], dim=-2)
    torch.testing.assert_close(out, (gates[..., None] * each).sum(-2), rtol=1e-5, atol=1e-6)
    g = gates[mask].detach().numpy()
    share = np.bincount(g.argmax(axis=1), minlength=4) / len(g)
    assert float(balance) == pytest.approx(4 * float((share * g.mean(axis=0)).sum()), rel=1e-5)
    # Even load: 1; one expert takes every frame: K.
    with torch.no_grad():
        mix.gate.weight.zero_()
        mix.gate.bias.zero_()
    assert float(mix(h, mask)[1]) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        mix.gate.bias.copy_(torch.tensor([30.0, 0, 0, 0]))
    assert float(mix(h, mask)[1]) == pytest.approx(4.0, abs=1e-4)


def test_the_objective_adds_the_balance_term_at_the_heads_weight() -> None:
    torch.manual_seed(0)
    head = build_head("moe", in_dim=5, tasks=("va", "expr"), trunk="fc", experts=3, balance_weight=0.25)
    x = torch.randn(2, 6, 5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    batch = Batch(inputs=x, mask=mask, targets={"va": torch.rand(2, 6, 2) - 0.5,
                                                "expr": torch.randint(0, 8, (2, 6))},
                  valid={"va": mask, "expr": mask}, rows=np.zeros((2, 6), np.int64))
    out = head(x, mask)
    assert out[BALANCE_KEY].ndim == 0 and set(out) == {"va", "expr", BALANCE_KEY}
    total, info = build_objective("mtl", head, ("va", "expr"))(out, batch)
    plain = build_objective("mtl", build_head("tasks", in_dim=5, tasks=("va", "expr"), trunk="fc"),
                            ("va", "expr"))(out, batch)[0]
    assert float(total) == pytest.approx(float(plain) + 0.25 * float(out[BALANCE_KEY]), rel=1e-6)
    assert info[f"train_{BALANCE_KEY}"] == pytest.approx(float(out[BALANCE_KEY]))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("moe"), n_train=4, n_val=2, n_test=1, n_frames=120)


def test_a_moe_run_records_its_experts_and_the_balance_per_epoch(world: World, tmp_path: Path) -> None:
    result = fit(config(world, tmp_path / "run", task="mtl", moe_experts=3, moe_balance=0.05, epochs=2))
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["head"]["name"] == "moe" and record["head"]["config"]["experts"] == 3
    assert record["head"]["config"]["balance_weight"] == 0.05 and record["train"]["moe_balance"] == 0.05
    assert record["label"] == "FAKE+Fc (MoE x3) (multi-task)"
    with open(tmp_path / "run" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    values = [float(r[f"train_{BALANCE_KEY}"]) for r in rows]
    assert len(values) == 2 and all(1.0 - 1e-6 <= v <= 3.0 + 1e-6 for v in values)  # within [1, K]
    assert [h[f"train_{BALANCE_KEY}"] for h in result.history] == pytest.approx(values, rel=1e-5)


@pytest.mark.parametrize("bad, message", [({"moe_experts": 1}, "0 \\(off\\) or >= 2"),
                                          ({"moe_experts": 3, "objective": "contrastive", "task": "expr"},
                                           "own head"),
                                          ({"moe_experts": 2, "moe_balance": -1.0}, "--moe-balance")])
def test_impossible_moe_settings_are_refused(world: World, tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fit(config(world, tmp_path / "r", **bad))

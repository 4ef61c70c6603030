"""utils/allocator.keep_heap: what it sets, what it leaves alone, and that it never changes a number."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from abawfeat.utils import allocator

_NAMES = tuple(allocator.SETTINGS)


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in _NAMES and k != allocator.OPT_OUT}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return res.stdout.strip().splitlines()[-1]


_APPLY = (
    "import json, os\n"
    "from abawfeat.utils.allocator import keep_heap\n"
    "applied = keep_heap()\n"
    f"names = {_NAMES!r}\n"
    "print(json.dumps({'applied': applied, 'again': keep_heap(),"
    " 'env': {k: os.environ.get(k) for k in names}}))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_sets_glibc_and_exports_the_settings_to_children() -> None:
    out = json.loads(_run(_APPLY))
    expected = {name: value for name, (_, value) in allocator.SETTINGS.items()}
    assert out["applied"] == expected
    assert out["again"] == {}  # idempotent: a second call does nothing
    assert out["env"] == {name: str(value) for name, value in expected.items()}
    assert expected["MALLOC_MMAP_THRESHOLD_"] == 32 * 1024 * 1024  # glibc refuses more (mallopt returns 0)


def test_keep_heap_leaves_the_users_settings_and_the_opt_out_alone() -> None:
    out = json.loads(_run(_APPLY, MALLOC_TOP_PAD_="4096"))
    assert "MALLOC_TOP_PAD_" not in out["applied"]
    assert out["env"]["MALLOC_TOP_PAD_"] == "4096"
    out = json.loads(_run(_APPLY, ABAWFEAT_MALLOC="default"))
    assert out["applied"] == {}
    assert all(v is None for v in out["env"].values())


_TRAIN = """
import hashlib, torch
from abawfeat.utils.allocator import keep_heap
keep_heap()
from abawfeat.heads import build_head
torch.manual_seed(0); torch.set_num_threads(1)
head = build_head("tasks", in_dim=64, tasks=("va",), trunk="%s", trunk_config={"hidden": 32})
opt = torch.optim.AdamW(head.parameters(), 1e-3)
x = torch.randn(8, 48, 64)
for _ in range(3):
    out = head(x)
    loss = sum(v.float().pow(2).mean() for v in (out.values() if isinstance(out, dict) else [out]))
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.sha256()
for p in head.state_dict().values():
    h.update(p.detach().float().numpy().tobytes())
print(h.hexdigest(), float(loss))
"""


@pytest.mark.parametrize("trunk", ["lstm", "mamba"])
def test_training_gives_the_same_bits_with_and_without_the_setting(trunk: str) -> None:
    ours = _run(_TRAIN % trunk)
    default = _run(_TRAIN % trunk, ABAWFEAT_MALLOC="default")
    assert ours == default
    assert float(ours.split()[1]) > 0  # it trained something


def test_the_cli_applies_it_before_any_command() -> None:
    code = ("import os, sys\n"
            "sys.argv = ['abawfeat', '--version']\n"
            "from abawfeat.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('MALLOC_TOP_PAD_'))\n")
    assert _run(code) == str(allocator.TOP_PAD)

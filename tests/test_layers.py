"""No module imports upward: the package's layers, lowest first (docs/architecture.md, "Module map").

Every ``import`` of an ``abawfeat`` module, at module level or inside a function, must name a module of
the same layer or a lower one. The library never imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "abawfeat"

# Lowest first. A module belongs to the first entry that is its name or a prefix of it.
LAYERS: list[tuple[str, ...]] = [
    ("abawfeat", "abawfeat.errors", "abawfeat.constants", "abawfeat.utils"),
    ("abawfeat.metrics", "abawfeat.losses", "abawfeat.tasks"),
    ("abawfeat.data", "abawfeat.submission", "abawfeat.reference"),
    ("abawfeat.encoders", "abawfeat.cache", "abawfeat.trunks", "abawfeat.audio", "abawfeat.video"),
    ("abawfeat.heads", "abawfeat.stage_one", "abawfeat.smoothing"),
    ("abawfeat.audio.extract", "abawfeat.train"),
    ("abawfeat.extract",),
    ("abawfeat.finetune", "abawfeat.predict", "abawfeat.ensemble", "abawfeat.cv", "abawfeat.analyze"),
    ("abawfeat.report", "abawfeat.reproduce", "abawfeat.backends"),
    ("abawfeat.ablate", "abawfeat.tune"),
    ("abawfeat.cli", "abawfeat.__main__"),
]


def layer(module: str) -> int:
    best, found = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), i
    assert found >= 0, f"{module} belongs to no layer: add it to LAYERS (and to docs/architecture.md)"
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> set[str]:
    """Every abawfeat module a file imports (``from abawfeat import metrics`` is ``abawfeat.metrics``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "abawfeat":
            if node.module == "abawfeat":
                out |= {f"abawfeat.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "abawfeat"}
    return out


def test_no_module_imports_upward() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for target in imported(ast.parse(path.read_text(encoding="utf-8"))):
            if layer(target) > layer(mod):
                upward.append(f"{mod} (layer {layer(mod)}) imports {target} (layer {layer(target)})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_can_fail() -> None:
    tree = ast.parse("def f():\n    from abawfeat.cli import app\n")
    assert layer("abawfeat.train.fit") < layer(next(iter(imported(tree))))

"""Every registered trunk, task, objective, fusion and head kind through the whole of stage two, and a trunk
and a task added the way docs/architecture.md says ("Add a trunk", "Add a task"), with no edit anywhere else
in the package."""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner
from worlds import World, build_world, config

from abawfeat.cli import app
from abawfeat.data import AffWild2
from abawfeat.heads import FUSIONS, HEADS
from abawfeat.predict import output_paths, predict
from abawfeat.submission import read_submission, score_submission, write_submission
from abawfeat.tasks import TASKS, Task, run_task_names, single, single_tasks, task, task_names
from abawfeat.train import OBJECTIVES, evaluate, fit
from abawfeat.trunks import TRUNKS, Context, Trunk, TrunkConfig, trunk_fields

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    # Prompt embeddings too (the same draws: they are drawn either way), so the contrastive objective runs.
    return build_world(tmp_path_factory.mktemp("registry-world"), n_train=4, n_val=2, n_test=1, n_frames=120,
                       text=True)


@pytest.fixture(scope="module")
def fused_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("registry-fused"), n_train=4, n_val=2, n_test=1, n_frames=120,
                       halves=True)


def _small(trunk: str) -> list[str]:
    """Command-line options that make any trunk tiny."""
    fields = trunk_fields(trunk)
    args = ["--hidden", "8"] if "hidden" in fields else []
    return args + (["--window", "16"] if TRUNKS.get(trunk)(8, TRUNKS.get(trunk).Config()).context().temporal
                   else [])


def _rescore(world: World, path: Path, task_name: str) -> dict:
    data = AffWild2(world.root)
    return score_submission(path, task_name, {v: data.annotation(task_name, "val", v)
                                              for v in data.videos(task_name, "val")})


def _through_stage_two(world: World, tmp_path: Path, run_task: str, options: list[str],
                       recipe_options: str, caches: tuple[Path, ...] = ()) -> None:
    """train-head with ``options``, evaluate, predict (val re-scored from the file against what evaluate
    reports; test), an ablate grid of one row with ``recipe_options``, and the report of both runs."""
    runner = CliRunner()
    run = tmp_path / "run"
    caches = caches or (world.cache,)
    cache_args = [a for c in caches for a in ("--cache", str(c))]
    res = runner.invoke(app, ["train-head", "--task", run_task, "--data", str(world.root), *cache_args,
                              "--out", str(run), "--epochs", "1", "--batch-size", "16", "--no-plots",
                              *options])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert res.exit_code == 0, res.output
    reported = json.loads(res.stdout)
    res = runner.invoke(app, ["predict", str(run), "--split", "val", "--out", str(tmp_path / "val.txt")])
    assert res.exit_code == 0, res.output
    for t, path in output_paths(tmp_path / "val.txt", run_task).items():
        rescored = _rescore(world, path, t)
        spec = single(t)
        key = spec.select_metric if spec.tunes_thresholds else spec.metric_keys[0]
        file_key = spec.metric_keys[0]
        assert rescored[file_key] == pytest.approx(reported[key], abs=1e-4), (t, rescored, reported)
    res = runner.invoke(app, ["predict", str(run), "--split", "test", "--out", str(tmp_path / "test.txt")])
    assert res.exit_code == 0, res.output

    from abawfeat.cache import FeatureCache

    backbones = {}
    for c in caches:
        with FeatureCache(c) as opened:
            backbones[str(opened.encoder)] = str(c)
    recipe = tmp_path / "grid.toml"
    recipe.write_text(f"""
[grid]
data = "{world.root}"
out = "{tmp_path / 'grid'}"
[caches]
{chr(10).join(f'{k} = "{v}"' for k, v in backbones.items())}
[defaults]
epochs = 1
plots = false
batch_size = 16
window = 16
[[rows]]
label = "row"
backbone = {json.dumps(list(backbones)) if len(caches) > 1 else json.dumps(next(iter(backbones)))}
tasks = ["{run_task}"]
{recipe_options}
""")
    res = runner.invoke(app, ["ablate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "| row |" in (tmp_path / "grid" / "results.md").read_text()
    record = json.loads((run / "config.json").read_text())
    res = runner.invoke(app, ["report", str(run), str(tmp_path / "grid" / "row" / run_task), "--out",
                              str(tmp_path / "report.html")])
    assert res.exit_code == 0, res.output
    assert html.escape(record["label"]) in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("trunk", TRUNKS.names())
def test_every_trunk_through_train_evaluate_predict_ablate_report(
    world: World, tmp_path: Path, trunk: str
) -> None:
    _through_stage_two(world, tmp_path, "va", ["--head", trunk, *_small(trunk)], f'head = "{trunk}"')
    label = TRUNKS.get(trunk).label
    assert f"FAKE+{label}" in (tmp_path / "report.html").read_text()


def _objective_cells(multi: bool) -> list[tuple[str, str]]:
    """Every objective with every run task it trains that is not that task's default (the defaults go
    through test_every_task_trains_...): single tasks, or multi-task runs."""
    return [(name, t) for name, spec in OBJECTIVES.items() for t in run_task_names()
            if spec.trains(t) and task(t).default_objective != name and (len(task_names(t)) > 1) == multi]


@pytest.mark.parametrize("objective, run_task", _objective_cells(multi=False))
def test_every_objective_through_train_evaluate_predict_ablate_report(
    world: World, tmp_path: Path, objective: str, run_task: str
) -> None:
    _through_stage_two(world, tmp_path, run_task, ["--objective", objective],
                       f'head = "fc"\nobjective = "{objective}"')
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["objective"] == objective
    spec = OBJECTIVES.get(objective)
    for key in spec.settings:  # the loss's own setting is in the run record
        assert key in record["train"]


@pytest.mark.parametrize("objective, run_task", _objective_cells(multi=True))
def test_every_objective_trains_the_multitask_head_and_its_files_rescore(
    world: World, tmp_path: Path, objective: str, run_task: str
) -> None:
    fit(config(world, tmp_path / "run", task=run_task, objective=objective, epochs=1))
    reported = evaluate(tmp_path / "run")
    result = predict(tmp_path / "run", "val", tmp_path / "preds.txt")
    for t in task_names(run_task):
        spec = single(t)
        rescored = _rescore(world, result.files[t], t)
        ours = reported[spec.select_metric] if spec.tunes_thresholds else reported[spec.metric_keys[0]]
        assert rescored[spec.metric_keys[0]] == pytest.approx(ours, abs=1e-4), (t, objective)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_every_fusion_through_train_evaluate_predict_ablate_report(
    fused_world: World, tmp_path: Path, fusion: str
) -> None:
    _through_stage_two(fused_world, tmp_path, "va",
                       ["--head", "mamba", "--hidden", "8", "--window", "16", "--fusion", fusion,
                        "--modality-dropout", "0.3"],
                       f'head = "mamba"\nhidden = 8\nfusion = "{fusion}"\nmodality_dropout = 0.3',
                       caches=fused_world.halves)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["train"]["fusion"] == fusion and record["train"]["modality_dropout"] == 0.3


# How a test asks for each head kind, and the task it trains; a new kind fails here until it says so.
# ("tasks" goes through every trunk's test above, "contrastive" through the contrastive objective's.)
HEAD_KIND_OPTIONS = {"moe": (["--moe-experts", "3"], "moe_experts = 3", "au")}


@pytest.mark.parametrize("kind", [k for k in HEADS.names() if k not in ("tasks", "contrastive")])
def test_every_head_kind_through_train_evaluate_predict_ablate_report(
    world: World, tmp_path: Path, kind: str
) -> None:
    assert kind in HEAD_KIND_OPTIONS, f"head kind {kind!r}: say in HEAD_KIND_OPTIONS how a run asks for it"
    options, recipe, run_task = HEAD_KIND_OPTIONS[kind]
    _through_stage_two(world, tmp_path, run_task, ["--head", "gru", "--hidden", "8", "--window", "16",
                                                   *options], f'head = "gru"\nhidden = 8\n{recipe}')
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["head"]["name"] == kind


@pytest.mark.parametrize("run_task", run_task_names())
def test_every_task_trains_and_its_files_rescore_to_what_evaluate_reports(
    world: World, tmp_path: Path, run_task: str
) -> None:
    fit(config(world, tmp_path / "run", task=run_task, epochs=1))
    reported = evaluate(tmp_path / "run")
    result = predict(tmp_path / "run", "val", tmp_path / "preds.txt")
    for t in task_names(run_task):
        spec = single(t)
        rescored = _rescore(world, result.files[t], t)
        for key in spec.metric_keys:
            # Files hold decisions at the run's tuned thresholds: the file's plain F1 is the tuned one.
            ours = reported[spec.select_metric] if spec.tunes_thresholds else reported[key]
            if key in rescored:
                assert rescored[key] == pytest.approx(ours, abs=1e-4), (t, key)


@pytest.mark.parametrize("spec", single_tasks(), ids=lambda s: s.name)
def test_every_task_writes_and_reads_its_submission_files(spec: Task, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((7, spec.width))
    if spec.name == "va":
        scores = scores * 2 - 1
    decisions = spec.decide(scores)
    path = write_submission(tmp_path / "s.txt", spec.name, {"vid_b": decisions, "vid_a": decisions[:3]})
    assert path.read_text().splitlines()[0] == spec.submission_header
    back = read_submission(path, spec.name)
    assert list(back) == ["vid_a", "vid_b"]
    np.testing.assert_allclose(back["vid_b"].astype(float), np.asarray(decisions, dtype=float), atol=1e-6)
    label_scores = rng.random((7, spec.width))
    labels = spec.decide(label_scores * 2 - 1 if spec.name == "va" else label_scores)
    scored = score_submission(path, spec.name, {"vid_b": (labels, np.ones(7, dtype=bool))})
    assert scored == {**spec.decision_metrics(back["vid_b"], labels), "n_frames": 7}


# ------------------------------------------------------------------------------- a trunk added by a user


@dataclass
class MeanConfig(TrunkConfig):
    frames: int = 3  # frames averaged: this one and the ones before it


class CausalMean(Trunk):
    """Average of the last `frames` frames (a toy trunk: the recipe's example)."""

    label = "Mean"
    Config = MeanConfig

    def context(self) -> Context:
        return Context("causal", receptive_field=self.config.frames)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        padded = torch.nn.functional.pad(x, (0, 0, self.config.frames - 1, 0))
        return padded.unfold(1, self.config.frames, 1).mean(dim=-1)


def test_a_new_trunk_needs_no_edit_anywhere_else(world: World, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(TRUNKS, "_entries", {**TRUNKS._entries})  # registered for this test only
    TRUNKS.register("mean")(CausalMean)
    res = CliRunner().invoke(app, ["train-head", "--task", "expr", "--head", "mean", "--trunk-opt",
                                   "frames=5",
                                   "--data", str(world.root), "--cache", str(world.cache), "--out",
                                   str(tmp_path / "run"), "--epochs", "2", "--window", "16", "--no-plots"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["label"] == "FAKE+Mean" and record["resolved"]["context"] == {"kind": "causal",
                                                                                 "receptive_field": 5}
    reported = evaluate(tmp_path / "run")
    predict(tmp_path / "run", "val", tmp_path / "e.txt")
    rescored = _rescore(world, tmp_path / "e.txt", "expr")
    assert rescored["f1_expr"] == pytest.approx(reported["f1_expr"], abs=1e-4)
    res = CliRunner().invoke(app, ["heads", "--json"])
    assert "mean" in {t["name"] for t in json.loads(res.stdout)["trunks"]}


# -------------------------------------------------------------------------------- a task added by a user


class ArousalTask(Task):
    """Arousal alone, from its own annotation folder: the recipe's example."""

    name = "arousal"
    title = "ARO"
    columns = ("arousal",)
    folders = ("Arousal_Challenge",)
    header = ("arousal",)
    value_names = ("arousal",)
    invalid = -5.0
    valid_rule = "[-1, 1]"
    label_shape = (1,)
    label_dtype = np.float32
    test_list_file = "Arousal_Challenge_test_set_release.txt"
    test_list_keyword = "arousal"
    sample_tag = "ARO"
    default_objective = "ccc"
    select_metric = "ccc_arousal_only"
    metric_keys = ("ccc_arousal_only",)
    table_columns = {"CCC_A": "ccc_arousal_only"}
    outputs_key = "arousal_pred"
    submission_values = 1

    def labels_and_validity(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        valid = ((values >= -1) & (values <= 1)).all(axis=1)
        out_of_range = ~valid & (values != self.invalid).all(axis=1)
        return np.where(valid[:, None], values, self.invalid).astype(np.float32), valid, out_of_range

    def activation(self, y: Tensor) -> Tensor:
        return torch.tanh(y)

    def to_scores(self, output: Tensor) -> Tensor:
        return output.clamp(-1, 1)

    def decide(self, scores: np.ndarray, thresholds: object = None) -> np.ndarray:
        return np.clip(scores, -1, 1)

    def decision_metrics(self, decisions: np.ndarray, labels: np.ndarray,
                         valid: np.ndarray | None = None) -> dict:
        from abawfeat.metrics import ccc, masked

        d, y = masked(valid, np.asarray(decisions).reshape(-1, 1), np.asarray(labels).reshape(-1, 1))
        return {"ccc_arousal_only": ccc(d[:, 0], y[:, 0])}

    def format_rows(self, decisions: np.ndarray) -> list[str]:
        return [f"{v:.6f}" for v in np.asarray(decisions).reshape(-1)]

    def check_decisions(self, video: str, decisions: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(decisions, dtype=np.float64).reshape(-1, 1), -1, 1)

    def parse_values(self, path: Path, fields: list[str], lineno: int) -> object:
        return [float(fields[0])]

    def stack_rows(self, rows: list) -> np.ndarray:
        return np.asarray(rows, dtype=np.float64).reshape(-1, 1)


def test_a_new_task_needs_no_edit_anywhere_else(world: World, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(TASKS, "_entries", {**TASKS._entries})  # registered for this test only
    TASKS.add("arousal", ArousalTask())
    # Its annotation files: arousal of the world's VA files, in the task's own folder of a copy of the tree.
    root = tmp_path / "tree"
    shutil.copytree(world.root, root)
    data = AffWild2(root)
    for split, folder in (("train", "Train_Set"), ("val", "Validation_Set")):
        for video in data.videos("va", split):
            ann = data.annotation("va", split, video)
            rows = [f"{a:.4f}" if ok else "-5" for (_, a), ok in zip(ann.labels, ann.valid, strict=True)]
            path = data.annotations_dir / "Arousal_Challenge" / folder / f"{video}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("arousal\n" + "\n".join(rows) + "\n")
    result = fit(config(world, tmp_path / "run", task="arousal", data=str(root), epochs=3))
    assert result.metrics["ccc_arousal_only"] > 0.3  # the world's features carry arousal
    reported = evaluate(tmp_path / "run")
    predict(tmp_path / "run", "val", tmp_path / "a.txt")
    again = AffWild2(root)
    truth = {v: again.annotation("arousal", "val", v) for v in again.videos("arousal", "val")}
    assert score_submission(tmp_path / "a.txt", "arousal", truth)["ccc_arousal_only"] == pytest.approx(
        reported["ccc_arousal_only"], abs=1e-4)

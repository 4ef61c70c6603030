"""Run plots, the HTML report and `abawfeat report`, on fake run directories written to the documented
contract (docs/architecture.md, "Run directory") with known numbers."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from abawfeat.cli import app
from abawfeat.constants import AU_NAMES, EXPR_CLASSES
from abawfeat.errors import ConfigError, DataError
from abawfeat.reference import TABLE3_COLUMNS, load_published
from abawfeat.report import PlotWarning, build_report, expected_plots, write_run_plots
from abawfeat.report.html import DECIMALS
from abawfeat.report.plots import expr_confusion, read_history, timeline_videos
from abawfeat.train.rundir import RunRecord, architecture_label

# Frames per validation video; the three longest are vid_b, vid_d, vid_a (vid_e is long but unlabelled).
VIDEO_LENGTHS = {"vid_a": 160, "vid_b": 260, "vid_c": 90, "vid_d": 200, "vid_e_left": 300}


def fake_outputs(tasks: tuple[str, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    video = np.concatenate([[v] * n for v, n in VIDEO_LENGTHS.items()])
    frame = np.concatenate([np.arange(1, n + 1) for n in VIDEO_LENGTHS.values()]).astype(np.int32)
    n = len(video)
    unlabelled = video == "vid_e_left"
    out: dict[str, np.ndarray] = {"video": video, "frame": frame, "has_crop": rng.random(n) > 0.05}
    t = frame / 40.0
    if "va" in tasks:
        label = np.stack([0.6 * np.sin(t), 0.5 * np.cos(0.7 * t)], axis=1).astype(np.float32)
        valid = ~unlabelled & (rng.random(n) > 0.1)
        label[~valid] = -5
        out |= {"va_label": label, "va_valid": valid,
                "va_pred": (0.7 * np.clip(label, -1, 1) + rng.normal(0, 0.15, (n, 2))).astype(np.float32)}
    if "expr" in tasks:
        label = ((frame // 30) % 8).astype(np.int64)
        valid = ~unlabelled
        label[~valid] = -1
        logits = rng.normal(0, 1, (n, 8))
        logits[np.arange(n), np.clip(label, 0, 7)] += 2.0
        prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out |= {"expr_label": label, "expr_valid": valid, "expr_prob": prob.astype(np.float32)}
    if "au" in tasks:
        label = (np.sin(t[:, None] * (1 + np.arange(12)) / 3) > 0.3).astype(np.int8)
        valid = ~unlabelled
        label[~valid] = -1
        prob = np.clip(0.6 * label + rng.uniform(0, 0.4, (n, 12)), 0, 1)
        out |= {"au_label": label, "au_valid": valid, "au_prob": prob.astype(np.float32)}
    return out


def fake_metrics(task: str, base: float) -> dict[str, Any]:
    """Known, deliberately long numbers (so rounding and exact values differ) keyed as in the contract."""
    m: dict[str, Any] = {"task": task, "split": "val", "best_epoch": 3}
    if task in ("va", "mtl"):
        m |= {"ccc_valence": base + 0.0123456789, "ccc_arousal": base - 0.0111111111,
              "ccc_va": base + 0.00061728395}
    if task in ("expr", "mtl"):
        m |= {"f1_expr": base - 0.1234567891,
              "f1_expr_per_class": {c: round(base - 0.02 * i, 6) for i, c in enumerate(EXPR_CLASSES)}}
    if task in ("au", "mtl"):
        m |= {"f1_au": base + 0.0314159265, "f1_au_opt": base + 0.0716531415,
              "f1_au_per_au": {a: round(0.3 + 0.03 * i, 6) for i, a in enumerate(AU_NAMES)},
              "f1_au_opt_per_au": {a: round(0.34 + 0.03 * i, 6) for i, a in enumerate(AU_NAMES)},
              "au_thresholds": {a: round(0.2 + 0.05 * i, 2) for i, a in enumerate(AU_NAMES)}}
    if task == "mtl":
        m["score"] = m["ccc_va"] + m["f1_expr"] + m["f1_au"]
    return m


def make_run(root: Path, name: str, task: str, backbone: str, head: str, base: float,
             *, outputs: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    # Shaped like abawfeat.train's config.json: the key choices on top, the whole TrainConfig under "train".
    config = {"task": task, "head": head, "backbone": backbone,
              "train": {"task": task, "head": head, "backbone": backbone, "epochs": 4, "lr": 0.001},
              "head_config": {"name": head, "config": {"hidden": 128}},
              "cache_fingerprint": {"encoder": backbone, "sha256": "ab" * 32}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(fake_metrics(task, base)))
    # Extra and sloppy columns on purpose: the reader must tolerate them.
    lines = ["epoch, train_loss, val_loss, val_metric, seconds, note, val_ccc_va, train_ccc_va"]
    for e in range(1, 5):
        lines.append(f"{e},{1.0 / e:.4f},{1.2 / e:.4f},{0.2 + 0.05 * e:.4f},{2.5 * e:.2f},ok,"
                     f"{0.2 + 0.05 * e:.4f},{0.25 + 0.06 * e:.4f}")
    (run / "history.csv").write_text("\n".join(lines) + "\n")
    if outputs:
        tasks = ("va", "expr", "au") if task == "mtl" else (task,)
        np.savez(run / "val_outputs.npz", **fake_outputs(tasks))
    return run


RUN_SPECS = [  # name, task, backbone, head, base
    ("va-lstm", "va", "ddamfn", "lstm", 0.45),
    ("expr-lstm", "expr", "ddamfn", "lstm", 0.40),
    ("au-fc", "au", "ddamfn", "fc", 0.38),
    ("mtl-clip", "mtl", "clip", "lstm", 0.50),
]


@pytest.fixture(scope="module")
def plotted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Each run's directory and what write_run_plots returned for it (plotting is the slow part: once)."""
    root = tmp_path_factory.mktemp("runs")
    made = {spec[0]: make_run(root, *spec) for spec in RUN_SPECS}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlotWarning)  # complete runs must plot without a single skip
        return {name: (path, write_run_plots(path)) for name, path in made.items()}


@pytest.fixture(scope="module")
def runs(plotted: dict[str, tuple[Path, list[Path]]]) -> dict[str, Path]:
    return {name: path for name, (path, _) in plotted.items()}


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    path = build_report(list(runs.values()), out)
    return path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- plots


@pytest.mark.parametrize("name", [spec[0] for spec in RUN_SPECS])
def test_every_expected_plot_is_a_valid_png(runs: dict[str, Path], name: str) -> None:
    task = json.loads((runs[name] / "metrics.json").read_text())["task"]
    expected = expected_plots(task)
    assert sorted(p.name for p in (runs[name] / "plots").glob("*.png")) == sorted(expected)
    for file in expected:
        with Image.open(runs[name] / "plots" / file) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 2000 and 300 <= height <= 2000, (file, image.size)
            image.verify()


def test_expected_plots_per_task() -> None:
    assert set(expected_plots("mtl")) == set(expected_plots("va")) | set(expected_plots("expr")) | set(
        expected_plots("au"))
    assert "expr_confusion.png" in expected_plots("expr") and "au_f1.png" not in expected_plots("expr")
    assert expected_plots("bogus") == ["learning_curves.png"]


def test_write_run_plots_returns_the_written_paths_in_report_order(
    plotted: dict[str, tuple[Path, list[Path]]],
) -> None:
    run, written = plotted["mtl-clip"]
    assert [p.name for p in written] == expected_plots("mtl")
    assert all(p.parent == run / "plots" for p in written)
    assert not list((run / "plots").glob(".*"))  # no temporary files left behind


def test_missing_pieces_skip_plots_with_a_warning_never_raise(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", "au", "ddamfn", "lstm", 0.4, outputs=False)
    (run / "history.csv").unlink()
    with pytest.warns(PlotWarning) as record:
        written = write_run_plots(run)
    assert [p.name for p in written] == ["au_f1.png"]  # metrics.json alone is enough for the F1 bars
    messages = " ".join(str(w.message) for w in record)
    assert "history.csv" in messages and "val_outputs.npz" in messages


def test_malformed_files_skip_plots_never_raise(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", "mtl", "ddamfn", "lstm", 0.4, outputs=False)
    (run / "metrics.json").write_text("{not json")
    bad = fake_outputs(("va", "expr", "au"))
    del bad["expr_prob"]
    bad["au_prob"] = bad["au_prob"][:10]  # wrong length
    np.savez(run / "val_outputs.npz", **bad)
    with pytest.warns(PlotWarning) as record:
        written = write_run_plots(run)
    names = {p.name for p in written}
    # The task comes from config.json when metrics.json is unreadable; VA plots are unaffected.
    assert {"learning_curves.png", "va_hist2d.png", "timeline_va.png"} <= names
    assert not names & {"expr_confusion.png", "timeline_expr.png", "au_f1.png", "timeline_au.png"}
    assert any("expr_prob" in str(w.message) for w in record)


def test_metrics_passed_by_the_trainer_before_metrics_json_exists(tmp_path: Path) -> None:
    # The trainer writes metrics.json last (its completion mark) and hands the record over instead.
    run = make_run(tmp_path, "r", "au", "ddamfn", "lstm", 0.4)
    record = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlotWarning)
        written = write_run_plots(run, metrics=record)
    assert [p.name for p in written] == expected_plots("au")


def test_missing_run_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        write_run_plots(tmp_path / "nope")


def test_history_reader_tolerates_spaces_text_and_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text("epoch, train_loss ,val_loss,val_metric,seconds,comment\n"
                    "1,0.9,1.1,0.3,2.0,x\n2,0.5,,0.4,2.1,y\n\n")
    history = read_history(path)
    assert history["train_loss"].tolist() == [0.9, 0.5]
    assert np.isnan(history["val_loss"][1]) and history["val_metric"].tolist() == [0.3, 0.4]
    assert np.isnan(history["comment"]).all()


def test_confusion_is_row_normalised_in_affwild2_order() -> None:
    label = np.array([1, 1, 1, 4, 4, 0, -1, 7])  # Anger x3, Happiness x2, Neutral, invalid, Other
    pred = np.array([4, 4, 1, 4, 4, 0, 3, 6])    # two Angers read as Happiness
    outputs = {"expr_label": label, "expr_prob": np.eye(8)[pred], "expr_valid": label >= 0}
    norm, support = expr_confusion(outputs)
    assert support.tolist() == [1, 3, 0, 0, 2, 0, 0, 1]
    assert norm[1, 4] == pytest.approx(2 / 3) and norm[1, 1] == pytest.approx(1 / 3)
    assert norm[4, 4] == 1.0 and norm[7, 6] == 1.0
    assert np.isnan(norm[3]).all()  # Fear has no valid frame: the invalid row predicted Fear is not counted
    np.testing.assert_allclose(np.nansum(norm, axis=1)[support > 0], 1.0)


def test_timeline_videos_are_the_longest_labelled_ones_deterministically() -> None:
    outputs = fake_outputs(("expr",))
    assert timeline_videos(outputs, "expr") == ["vid_b", "vid_d", "vid_a"]  # vid_e_left has no labels
    tie = {"video": np.array(["z", "z", "b", "b", "m"]), "expr_label": np.zeros(5, dtype=np.int64),
           "expr_valid": np.ones(5, dtype=bool)}
    assert timeline_videos(tie, "expr", k=2) == ["b", "z"]


# ---------------------------------------------------------------------------------------------- report


class _Collector(HTMLParser):
    """Table-3 cells, every src / href, and the structure the assertions need."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.rows: list[dict[str, Any]] = []
        self._row: dict[str, Any] | None = None
        self._cell: dict[str, Any] | None = None
        self._depth_table3 = 0
        self.open_tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("src", "href"):
            if key in a:
                self.links.append((key, a[key]))
        if tag == "table" and a.get("id") == "table3":
            self._depth_table3 = 1
        if not self._depth_table3:
            return
        if tag == "tr" and a.get("class") in ("run-row", "ref-row"):
            self._row = {"class": a["class"], "label": a.get("data-label") or a.get("data-ref"), "cells": {}}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None and "data-col" in a:
            self._cell = {"title": a.get("title"), "class": a.get("class", ""), "text": "", "bold": False}
            self._row["cells"][a["data-col"]] = self._cell
        elif tag == "b" and self._cell is not None:
            self._cell["bold"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._depth_table3 = 0

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data


def _parse(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    parser.close()
    return parser


def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    _, text = report
    parser = _parse(text)
    srcs = [v for k, v in parser.links if k == "src"]
    hrefs = [v for k, v in parser.links if k == "href"]
    assert not [v for _, v in parser.links if re.match(r"\s*(https?:)?//", v, re.I)]
    assert all(v.startswith("#") for v in hrefs)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    assert all(v.startswith("data:image/png;base64,") for v in srcs)
    # Every plot of every run is embedded, and each one decodes to the PNG on disk.
    assert len(srcs) == sum(len(expected_plots(spec[1])) for spec in RUN_SPECS)
    for src in srcs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert image.format == "PNG"


def test_table3_numbers_equal_metrics_json(report: tuple[Path, str], runs: dict[str, Path]) -> None:
    _, text = report
    rows = {r["label"]: r for r in _parse(text).rows if r["class"] == "run-row"}
    # The VA and EXPR runs of DDAMFN+LSTM merge into one row; AU-only DDAMFN+Fc and the CLIP MTL run apart.
    assert set(rows) == {"DDAMFN+LSTM", "DDAMFN+Fc", "CLIP+LSTM (multi-task)"}
    sources = {"DDAMFN+LSTM": ["va-lstm", "expr-lstm"], "DDAMFN+Fc": ["au-fc"],
               "CLIP+LSTM (multi-task)": ["mtl-clip"]}
    expected: dict[str, dict[str, float]] = {}
    for label, names in sources.items():
        expected[label] = {}
        for name in names:
            metrics = json.loads((runs[name] / "metrics.json").read_text())
            expected[label] |= {c: metrics[c] for c in TABLE3_COLUMNS if c in metrics}
    checked = 0
    for label, row in rows.items():
        for column in TABLE3_COLUMNS:
            cell = row["cells"][column]
            if column not in expected[label]:
                assert cell["text"].strip() == "–"
                continue
            value = expected[label][column]
            assert float(cell["title"]) == value  # exact, not rounded
            assert cell["text"].strip() == f"{value:.{DECIMALS}f}"
            checked += 1
    assert checked == 2 + 2 + 4  # va+expr, au+au_opt, all four of the MTL run
    # Bold marks exactly the best of our runs in each column (references never compete).
    for column in TABLE3_COLUMNS:
        values = {label: v[column] for label, v in expected.items() if column in v}
        best = max(values, key=values.__getitem__)
        bold = [label for label, row in rows.items() if row["cells"][column]["bold"]]
        assert bold == [best], column


def test_reference_rows_carry_published_numbers_and_split(report: tuple[Path, str]) -> None:
    _, text = report
    refs = {r["label"]: r for r in _parse(text).rows if r["class"] == "ref-row"}
    published = load_published()
    assert list(refs) == [p.id for p in published]
    for p in published:
        for column in TABLE3_COLUMNS:
            value = p.value(column)
            cell = refs[p.id]["cells"][column]
            if value is None:
                assert cell["text"].strip() == "–"
            else:
                assert float(cell["title"]) == value and not cell["bold"]
        assert p.source and p.source in html.unescape(text)
    assert 'class="split test">test' in text and 'class="split dev">development' in text


def test_published_reference_numbers() -> None:
    published = {p.id: p for p in load_published()}
    assert len(published) == 10
    assert (published["abaw8-baseline"].ccc_va, published["abaw8-baseline"].f1_au_opt) == (0.22, None)
    lstm = published["seed-ddamfn-lstm"]
    assert (lstm.ccc_va, lstm.f1_expr, lstm.f1_au, lstm.f1_au_opt) == (0.479, 0.289, 0.411, 0.451)
    assert published["seed-clip-lstm"].f1_expr == 0.341 and published["seed-clip-fc"].f1_expr == 0.282
    assert published["abaw6-winner-test"].split == "test"
    # The 10th ABAW (2026): Team RAS's VA on its development set, the expression winner and HSEmotion.
    ras = published["ras-abaw10-va"]
    assert (ras.split, ras.ccc_va, ras.f1_expr, ras.f1_au) == ("development", 0.658, None, None)
    assert (published["abaw10-expr-winner"].split, published["abaw10-expr-winner"].f1_expr) == ("validation",
                                                                                                0.537)
    hse = published["hsemotion-abaw10"]
    assert (hse.split, hse.ccc_va, hse.f1_expr, hse.f1_au, hse.f1_au_opt) == ("validation", 0.562, 0.474,
                                                                              0.547, None)
    assert all(p.split == "validation" for k, p in published.items()
               if k not in ("abaw6-winner-test", "ras-abaw10-va"))


def test_report_sections_show_config_and_per_item_metrics(report: tuple[Path, str]) -> None:
    _, text = report
    assert text.count('<section class="run"') == len(RUN_SPECS)
    assert "full config.json" in text and "<th>train.lr</th>" in text
    assert "<th>train.task</th>" not in text  # nested keys repeating a top-level setting are not shown twice
    assert "sha256" not in text.split("<details>")[0]  # fingerprints stay out of the summary table
    for au in AU_NAMES:
        assert f"<th>{au}</th>" in text
    assert all(f"<th>{c}</th>" in text for c in EXPR_CLASSES)


def test_text_from_runs_is_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path, 'va<img src=x onerror="1">&', "va", "ddamfn", "<b>lstm</b>", 0.4, outputs=False)
    with pytest.warns(PlotWarning):  # no val_outputs.npz: learning curves only, enough to embed one image
        text = build_report([run], tmp_path / "r.html").read_text()
    assert "<img src=x" not in text and "<b>lstm</b>" not in text
    assert "&lt;img src=x onerror=&quot;1&quot;&gt;&amp;" in text and "&lt;b&gt;lstm&lt;/b&gt;" in text
    srcs = [v for k, v in _parse(text).links if k == "src"]
    assert srcs and all(v.startswith("data:image/png;base64,") for v in srcs)


def test_same_architecture_same_task_runs_get_separate_rows(tmp_path: Path) -> None:
    a = make_run(tmp_path, "seed1", "va", "ddamfn", "lstm", 0.4, outputs=False)
    b = make_run(tmp_path, "seed2", "va", "ddamfn", "lstm", 0.5, outputs=False)
    with pytest.warns(PlotWarning):
        text = build_report([a, b, a], tmp_path / "r.html").read_text()
    labels = [r["label"] for r in _parse(text).rows if r["class"] == "run-row"]
    assert labels == ["DDAMFN+LSTM · seed1", "DDAMFN+LSTM · seed2"]  # the duplicate `a` is counted once


@pytest.mark.parametrize(("config", "label"), [
    # Run records written before the record format (config.json of abawfeat 0.1) are read in today's terms.
    ({"task": "va", "backbone": "ddamfn", "head": "fc", "train": {}}, "DDAMFN+Fc"),
    ({"task": "expr", "head": "lstm", "cache_fingerprint": {"encoder": "clip"}, "train": {}}, "CLIP+LSTM"),
    ({"task": "va", "kind": "finetune", "backbone": "ddamfn", "head": "fc", "train": {}},
     "DDAMFN+Fc (end-to-end)"),
    ({"task": "mtl", "backbone": "ddamfn", "head": "fc", "train": {}}, "DDAMFN+Fc (multi-task)"),
])
def test_run_records_label_the_architecture(tmp_path: Path, config: dict[str, Any], label: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert RunRecord.read(tmp_path).label == label


def test_labels_come_from_the_registries() -> None:
    assert architecture_label(["ddamfn"], "gru", "au") == "DDAMFN+GRU"
    assert architecture_label(["ddamfn", "clip"], "lstm", "mtl") == "DDAMFN&CLIP+LSTM (multi-task)"
    assert architecture_label(["clip"], "fc", "expr", "finetune") == "CLIP+Fc (end-to-end)"


def test_build_report_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/metrics\.json"):
        build_report([tmp_path / "empty"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_out_replaces_an_earlier_report_and_nothing_else(tmp_path: Path) -> None:
    run = make_run(tmp_path, "seed1", "va", "ddamfn", "lstm", 0.4, outputs=False)
    with pytest.warns(PlotWarning):
        first = build_report([run], tmp_path / "r.html").read_text()
    assert '<meta name="generator" content="abawfeat ' in first
    # A report written before the generator tag is recognised by its footer, and replaced.
    (tmp_path / "old.html").write_text(first.replace('<meta name="generator"', '<meta name="x-old"'))
    build_report([run], tmp_path / "old.html")
    assert '<meta name="generator"' in (tmp_path / "old.html").read_text()
    for name, content in (("mine.html", "<!DOCTYPE html>\n<p>my page</p>\n"), ("metrics.json", "{}\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=f"--out .*{name}: exists and is not an abawfeat report"):
            build_report([run], tmp_path / name)
        assert (tmp_path / name).read_text() == content
    with pytest.raises(ConfigError, match="is a folder"):
        build_report([run], tmp_path)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_report_writes_plots_for_runs_lacking_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path, "fresh", "expr", "clip", "fc", 0.3)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").is_file()
    assert result.stdout.strip() == "report.html"
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == sorted(expected_plots("expr"))


def test_cli_report_out_option(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x" / "cmp.html"
    result = CliRunner().invoke(app, ["report", str(runs["va-lstm"]), str(runs["au-fc"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and out.is_file()


@pytest.mark.parametrize("problem", ["missing", "no-metrics"])
def test_cli_report_bad_run_dir_is_one_line_exit_2(tmp_path: Path, problem: str) -> None:
    run = tmp_path / "run"
    if problem == "no-metrics":
        run.mkdir()
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert ("metrics.json" if problem == "no-metrics" else "does not exist") in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "r.html").exists()


def test_seeds_of_one_cell_are_one_row_with_mean_std_and_ties_marked(tmp_path: Path) -> None:
    # ablate's layout for a row with seeds: <row>/<task>/seed-<s>. The three LSTM seeds are one row (their
    # mean and sample std, by hand); the Fc run is less than that spread from it (marked), the GRU run not.
    seeds = [make_run(tmp_path / "lstm" / "va", f"seed-{s}", "va", "ddamfn", "lstm", base, outputs=False)
             for s, base in enumerate((0.40, 0.45, 0.50))]
    fc = make_run(tmp_path, "fc-va", "va", "ddamfn", "fc", 0.43, outputs=False)
    gru = make_run(tmp_path, "gru-va", "va", "ddamfn", "gru", 0.30, outputs=False)
    with pytest.warns(PlotWarning):
        text = build_report([*seeds, fc, gru], tmp_path / "r.html").read_text()
    rows = {r["label"]: r for r in _parse(text).rows if r["class"] == "run-row"}
    assert list(rows) == ["DDAMFN+LSTM", "DDAMFN+Fc", "DDAMFN+GRU"]
    lstm = rows["DDAMFN+LSTM"]["cells"]["ccc_va"]
    mean = (0.40 + 0.45 + 0.50) / 3 + 0.00061728395
    assert lstm["bold"] and lstm["text"].startswith(f"{mean:.3f} ± 0.050")
    assert f"mean {mean!r}"[:12] in lstm["title"] and "over 3 seeds" in lstm["title"]
    assert "within" in rows["DDAMFN+Fc"]["cells"]["ccc_va"]["class"]  # 0.02 below the best, spread 0.05
    assert "≈" in rows["DDAMFN+Fc"]["cells"]["ccc_va"]["text"]
    assert "within" not in rows["DDAMFN+GRU"]["cells"]["ccc_va"]["class"]  # 0.15 below: a difference

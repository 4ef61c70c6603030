"""One self-contained HTML report comparing run directories in the seed paper's Table 3 layout.

The file must open offline and be mailable as one attachment: plots are embedded as base64 data URIs, the CSS
is inline, and nothing refers to a font, script or image elsewhere. Every text that comes from a run (paths,
config values, names) is passed through ``html.escape``. Numbers are shown with ``DECIMALS`` places and carry
their exact ``repr`` in a ``title`` attribute, so the report never silently disagrees with metrics.json.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat import __version__
from abawfeat.errors import ConfigError, DataError, RunError
from abawfeat.reference import TABLE3_COLUMNS, PublishedResult, load_published
from abawfeat.report.plots import PLOT_CAPTIONS, PLOTS_DIR, write_run_plots
from abawfeat.tasks import run_task_names, single_tasks, task
from abawfeat.train.rundir import RunRecord
from abawfeat.utils.io import atomic_write_text, file_in_the_way, what_is

DECIMALS = 3
COLUMN_HEADERS: dict[str, str] = {
    "ccc_va": "CCC<sub>VA</sub>",
    "f1_expr": "F1<sub>Expr</sub>",
    "f1_au": "F1<sub>AU</sub>",
    "f1_au_opt": "F1<sub>AUopt</sub>",
}
# Metrics shown per run, in the order the tasks declare them (single tasks, then task sets).
_MAIN_METRICS: tuple[str, ...] = tuple(
    dict.fromkeys(k for n in run_task_names() for k in task(n).metric_keys)
)
_PER_ITEM: tuple[str, ...] = tuple(k for t in single_tasks() for k in t.per_item_keys.values())
_CONFIG_ROWS_MAX = 24


@dataclass
class Run:
    """One run directory as the report sees it."""

    index: int
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    label: str
    task: str
    plots: list[Path] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"run-{self.index}"


@dataclass
class Table3Row:
    label: str
    runs: list[Run]
    values: dict[str, tuple[float, Run]]  # column -> (exact value or mean over seeds, a run it came from)
    # column -> (sample standard deviation, number of runs) where the column averages several seeds' runs
    spread: dict[str, tuple[float, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- reading


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg}", exc.lineno) from None
    except OSError as exc:
        raise DataError(path, f"cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object")
    return data


def read_run(index: int, run_dir: str | Path) -> Run:
    """Read one run directory; missing directory or metrics.json is the user's error (one line)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(path, "run directory does not exist")
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(metrics_path, "missing: not a finished run directory (training writes it last)")
    metrics = _load_json_object(metrics_path)
    config_path = path / "config.json"
    config = _load_json_object(config_path) if config_path.is_file() else {}
    try:
        label = RunRecord.read(path).label
    except RunError:
        label = "?"  # a run record from elsewhere: the run is still shown, under its directory's name
    task_name = str(metrics.get("task") or config.get("task") or "?")
    return Run(index=index, path=path, metrics=metrics, config=config, label=label, task=task_name)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


_SEED_DIR = re.compile(r"seed-\d+")


def _replicates(group: Sequence[Run]) -> list[list[Run]]:
    """Runs of one architecture in units: the runs of one cell over its seeds (directories ``seed-<s>``
    side by side, as ``ablate`` writes a row with ``seeds``, of one task) form one unit; any other run is a
    unit of its own."""
    units: dict[Any, list[Run]] = {}
    for run in group:
        seeded = _SEED_DIR.fullmatch(run.path.name) is not None
        key: Any = (run.task, str(run.path.parent.resolve())) if seeded else run.index
        units.setdefault(key, []).append(run)
    return list(units.values())


def _unit_name(unit: Sequence[Run]) -> str:
    first = unit[0].path
    return f"{first.parent.parent.name}/{first.parent.name}" if len(unit) > 1 else first.name


def table3_rows(runs: Sequence[Run]) -> list[Table3Row]:
    """Runs of one architecture merge into one row (a VA run and an AU run of DDAMFN+LSTM fill different
    columns); the runs of one cell over several seeds fill a column with their mean (and spread). When two
    units of an architecture would fill the same column, merging would hide one of them, so each of those
    gets its own row, labelled with its directory name."""
    import statistics

    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    rows: list[Table3Row] = []
    for label, group in by_label.items():
        units = _replicates(group)
        filled = [{c for c in TABLE3_COLUMNS if any(_finite(r.metrics.get(c)) is not None for r in u)}
                  for u in units]
        clash = any(filled[i] & filled[j] for i in range(len(units)) for j in range(i + 1, len(units)))
        parts = [[u] for u in units] if clash else [units]
        for members in parts:
            values: dict[str, tuple[float, Run]] = {}
            spread: dict[str, tuple[float, int]] = {}
            for unit in members:
                for column in TABLE3_COLUMNS:
                    found = [(v, r) for r in unit if (v := _finite(r.metrics.get(column))) is not None]
                    if not found:
                        continue
                    numbers = [v for v, _ in found]
                    mean = numbers[0] if len(numbers) == 1 else statistics.fmean(numbers)
                    values[column] = (mean, found[0][1])
                    if len(numbers) > 1:
                        spread[column] = (statistics.stdev(numbers), len(numbers))
            name = f"{label} · {_unit_name(members[0])}" if clash else label
            rows.append(Table3Row(label=name, runs=[r for u in members for r in u], values=values,
                                  spread=spread))
    return rows


def within_spread(rows: Sequence[Table3Row], column: str) -> set[int]:
    """Indices of the rows whose ``column`` differs from the best row's by less than the spread (the larger
    of the two rows' standard deviations over seeds): those differences are not differences. Empty when
    the best row has no rival with a spread to compare."""
    scored = [(i, row.values[column][0]) for i, row in enumerate(rows) if column in row.values]
    if not scored:
        return set()
    best_i, best = max(scored, key=lambda t: t[1])
    best_std = rows[best_i].spread.get(column, (0.0, 1))[0]
    out = set()
    for i, value in scored:
        std = max(best_std, rows[i].spread.get(column, (0.0, 1))[0])
        if i != best_i and std > 0 and best - value < std:
            out.add(i)
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: float) -> str:
    return f"{value:.{DECIMALS}f}"


def _num_cell(value: Any, *, bold: bool = False, extra: str = "", spread: tuple[float, int] | None = None,
              tie: bool = False) -> str:
    number = _finite(value)
    if number is None:
        # Not reported (None) or not a finite number: a dash, with what was there on hover.
        hover = "not reported" if value is None else repr(value)
        return f'<td class="num na" title="{_e(hover)}"{extra}>–</td>'
    text = fmt(number)
    hover = repr(number)
    if spread is not None:
        std, n = spread
        text += f' <span class="sd">± {fmt(std)}</span>'
        hover = f"mean {number!r} over {n} seeds, sample std {std!r}"
    if bold:
        text = f"<b>{text}</b>"
    if tie:
        text += ' <span class="tie">≈</span>'
        hover += "; differs from the best row by less than the spread"
    classes = "num" + (" best" if bold else "") + (" within" if tie else "")
    return f'<td class="{classes}" title="{_e(hover)}"{extra}>{text}</td>'


def _table3(rows: Sequence[Table3Row], published: Sequence[PublishedResult]) -> str:
    best = {}
    for column in TABLE3_COLUMNS:
        values = [row.values[column][0] for row in rows if column in row.values]
        if values:
            best[column] = max(values)  # higher is better for all four columns
    head = "".join(f"<th>{COLUMN_HEADERS[c]}</th>" for c in TABLE3_COLUMNS)
    out = [
        '<table class="table3" id="table3">',
        f"<thead><tr><th>Architecture</th>{head}<th>Split</th><th>Runs / source</th></tr></thead>",
        "<tbody>",
    ]
    ties = {column: within_spread(rows, column) for column in TABLE3_COLUMNS}
    for i, row in enumerate(rows):
        cells = []
        for column in TABLE3_COLUMNS:
            if column in row.values:
                value, run = row.values[column]
                attrs = f' data-col="{column}" data-run="{_e(run.path)}"'
                cells.append(_num_cell(value, bold=value == best.get(column), extra=attrs,
                                       spread=row.spread.get(column), tie=i in ties[column]))
            else:
                cells.append(f'<td class="num na" data-col="{column}">–</td>')
        links = ", ".join(f'<a href="#{r.anchor}">{_e(r.path.name)}</a> <span class="tag">{_e(r.task)}</span>'
                          for r in row.runs)
        out.append(f'<tr class="run-row" data-label="{_e(row.label)}"><th scope="row">{_e(row.label)}</th>'
                   f'{"".join(cells)}<td>validation</td><td class="runs">{links}</td></tr>')
    if published:
        span = len(TABLE3_COLUMNS) + 3
        out.append(f'<tr class="divider"><td colspan="{span}">Published results, for context (never bold; '
                   "test-set and development-set numbers are not comparable with validation)</td></tr>")
    for n, ref in enumerate(published, start=1):
        cells = "".join(_num_cell(ref.value(c), extra=f' data-col="{c}"') for c in TABLE3_COLUMNS)
        split_class = {"test": "test", "development": "dev"}.get(ref.split, "val")
        out.append(f'<tr class="ref-row" data-ref="{_e(ref.id)}"><th scope="row">{_e(ref.label)}</th>{cells}'
                   f'<td><span class="split {split_class}">{_e(ref.split)}</span></td>'
                   f'<td class="runs"><a href="#ref-{n}">[{n}]</a></td></tr>')
    out.append("</tbody></table>")
    if published:
        out.append('<ol class="sources">')
        for n, ref in enumerate(published, start=1):
            note = f' <span class="note">{_e(ref.note)}</span>' if ref.note else ""
            out.append(f'<li id="ref-{n}"><b>{_e(ref.label)}</b> ({_e(ref.split)}): '
                       f"{_e(ref.source)}{note}</li>")
        out.append("</ol>")
    return "\n".join(out)


def _summary_value(value: Any) -> str | None:
    """A config value short enough for the summary table, as text; None for anything bigger."""
    if isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return ", ".join(str(v) for v in value)
        return None
    return None if isinstance(value, Mapping) else str(value)


def _summary_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Top-level settings, then one level of nested configs (``train.lr``, ``head_config.name``)."""

    def hidden(key: str) -> bool:
        return "fingerprint" in key or "provenance" in key  # long hashes: in the full JSON only

    rows: list[tuple[str, str]] = []
    for key, value in config.items():
        if hidden(key):
            continue
        if isinstance(value, Mapping):
            for sub, inner in value.items():
                if hidden(sub) or (sub in config and config[sub] == inner):
                    continue  # train.task when task is already shown
                text = _summary_value(inner)
                if text is not None:
                    rows.append((f"{key}.{sub}", text))
        else:
            text = _summary_value(value)
            if text is not None:
                rows.append((key, text))
    return rows


def _config_summary(run: Run) -> str:
    rows = _summary_rows(run.config)
    shown = rows[:_CONFIG_ROWS_MAX]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in shown)
    more = f'<p class="muted">{len(rows) - len(shown)} more in the full config below.</p>' if len(rows) > len(
        shown) else ""
    if not run.config:
        return '<p class="muted">config.json missing or empty.</p>'
    full = _e(json.dumps(run.config, indent=2, sort_keys=False, default=str))
    return (f'<table class="kv">{body}</table>{more}'
            f"<details><summary>full config.json</summary><pre>{full}</pre></details>")


def _metrics_tables(run: Run) -> str:
    m = run.metrics
    rows = [f"<tr><th>{_e(k)}</th>{_num_cell(m[k])}</tr>" for k in _MAIN_METRICS if k in m]
    known = {*_MAIN_METRICS, *_PER_ITEM, "task", "split", "best_epoch"}
    # Extra scalar metrics a newer trainer may add are shown too rather than silently dropped.
    rows += [f"<tr><th>{_e(k)}</th>{_num_cell(v)}</tr>" for k, v in m.items()
             if k not in known and _finite(v) is not None]
    info = " · ".join(f"{_e(k)}: {_e(m[k])}" for k in ("task", "split", "best_epoch") if k in m)
    parts = [f'<p class="muted">{info}</p>' if info else "",
             f'<table class="kv metrics">{"".join(rows)}</table>']
    for spec in single_tasks():
        tables = {col: m.get(key) if isinstance(m.get(key), Mapping) else {}
                  for col, key in spec.per_item_keys.items()}
        if not any(tables.values()):
            continue
        items = [c for c in spec.columns if any(c in d for d in tables.values())]
        items += sorted({c for d in tables.values() for c in d} - set(items))
        body = "".join(f"<tr><th>{_e(c)}</th>" + "".join(_num_cell(d.get(c)) for d in tables.values())
                       + "</tr>" for c in items)
        head = "".join(f"<th>{_e(col)}</th>" for col in tables)
        parts.append(f'<table class="kv small"><thead><tr><th>{_e(spec.item_name)}</th>{head}</tr></thead>'
                     f"{body}</table>")
    return "".join(parts)


def _plot_order(plots: Iterable[Path]) -> list[Path]:
    order = {name: i for i, name in enumerate(PLOT_CAPTIONS)}
    return sorted(plots, key=lambda p: (order.get(p.name, len(order)), p.name))


def _figures(run: Run) -> str:
    if not run.plots:
        return '<p class="muted">No plots (see the warnings printed when the report was built).</p>'
    figures = []
    for path in run.plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = PLOT_CAPTIONS.get(path.name, path.stem.replace("_", " "))
        wide = " wide" if path.name.startswith("timeline_") else ""
        figures.append(f'<figure class="plot{wide}"><img src="data:image/png;base64,{data}" '
                       f'alt="{_e(path.stem)}"><figcaption><code>{_e(path.name)}</code>: {_e(caption)}'
                       "</figcaption></figure>")
    return f'<div class="plots">{"".join(figures)}</div>'


def _run_section(run: Run) -> str:
    return (
        f'<section class="run" id="{run.anchor}">'
        f'<h2>{_e(run.label)} <span class="tag">{_e(run.task)}</span></h2>'
        f'<p class="path"><code>{_e(run.path)}</code></p>'
        '<div class="meta">'
        f'<div><h3>Configuration</h3>{_config_summary(run)}</div>'
        f'<div><h3>Validation metrics</h3>{_metrics_tables(run)}</div>'
        "</div>"
        f"{_figures(run)}"
        "</section>"
    )


_CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #d9dee5; --bg-alt: #f5f7fa; --accent: #2457a6; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 2px; }
h3 { font-size: 14px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  margin: 6px 0 8px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
.muted, .path { color: var(--muted); font-size: 13px; margin: 4px 0 10px; }
table { border-collapse: collapse; }
.table3 { width: 100%; margin: 10px 0 6px; font-size: 14.5px; }
.table3 th, .table3 td { border-bottom: 1px solid var(--line); padding: 7px 12px; text-align: left; }
.table3 thead th { border-bottom: 2px solid var(--fg); background: var(--bg-alt); }
.table3 td.num, .table3 thead th:nth-child(n+2):nth-child(-n+5) { text-align: right; }
.num { font-variant-numeric: tabular-nums; }
.num.na { color: #a0a8b3; }
.best b { color: #0d3b85; }
.sd { color: var(--muted); font-size: 12px; }
.tie { color: #8a6d00; font-weight: bold; }
.run-row th { font-weight: 600; }
tr.divider td { background: var(--bg-alt); color: var(--muted); font-size: 12.5px; font-style: italic;
  padding: 5px 12px; border-bottom: 1px solid var(--line); }
.ref-row th { font-weight: 400; }
.ref-row td, .ref-row th { color: #4b5563; }
.runs { font-size: 13px; }
.tag { display: inline-block; font-size: 11.5px; font-weight: 600; color: var(--accent); background: #e8effa;
  border-radius: 4px; padding: 0 6px; vertical-align: middle; }
.split { font-size: 12px; border-radius: 4px; padding: 1px 6px; }
.split.val { background: #e6f4ea; color: #1e6b34; }
.split.test { background: #fdecea; color: #a4281b; }
.split.dev { background: #fff4e0; color: #8a5300; }
.sources { font-size: 12.5px; color: var(--muted); padding-left: 22px; margin: 6px 0 0; }
.sources li { margin: 3px 0; }
.note { font-style: italic; }
.run { border-top: 3px solid var(--line); margin-top: 38px; padding-top: 18px; }
.meta { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 28px; }
.kv { font-size: 13px; margin-bottom: 10px; }
.kv th, .kv td { padding: 3px 10px 3px 0; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
.kv th { font-weight: 500; color: var(--muted); }
.kv td { overflow-wrap: anywhere; }
.kv.metrics td { font-weight: 600; }
.kv.small { display: inline-table; margin-right: 24px; }
.kv.small td.num, .kv.metrics td.num { text-align: right; min-width: 64px; }
details { margin: 6px 0; font-size: 13px; }
pre { background: var(--bg-alt); padding: 10px; max-height: 360px; overflow: auto; border-radius: 4px; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 18px; margin-top: 16px;
  align-items: start; }
.plot { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
.plot.wide { grid-column: 1 / -1; }
.plot img { width: 100%; height: auto; display: block; }
.plot figcaption { font-size: 12.5px; color: var(--muted); margin-top: 6px; }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
@media (max-width: 900px) { .meta, .plots { grid-template-columns: 1fr; } }
""".strip()


# How a report this module wrote is recognised, so that --out replaces an earlier report and nothing else:
# the generator tag (in the first lines), or, in reports written before it, the closing footer.
_GENERATOR = '<meta name="generator" content="abawfeat '
_FOOTER = "How to read this report: docs/reports.md in the abawfeat repository."


def render_report(runs: Sequence[Run], published: Sequence[PublishedResult], title: str,
                  appendix: tuple[str, Path | None] | None = None) -> str:
    """The report as one HTML string (no file access except reading the runs' plot PNGs).
    ``appendix``: a search's trials table (its markdown text, shown as is) and importance plot."""
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = table3_rows(runs)
    index = "".join(f'<li><a href="#{r.anchor}">{_e(r.label)}</a> <span class="tag">{_e(r.task)}</span> '
                    f"<code>{_e(r.path)}</code></li>" for r in runs)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'{_GENERATOR}{_e(__version__)}">',
        f"<title>{_e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{len(runs)} run(s) · generated {_e(when)} by abawfeat {_e(__version__)} · '
        "validation metrics at each run's best epoch · bold: best of these runs per column · "
        "rows over several seeds: mean ± sample std; ≈: less than the spread from the best row · "
        f"numbers rounded to {DECIMALS} decimals, exact value on hover</p>",
        "<h2>Results (Table 3 layout)</h2>",
        _table3(rows, published),
        *_appendix(appendix),
        "<h2 style=\"margin-top:28px\">Runs</h2>",
        f'<ol class="index">{index}</ol>',
        *(_run_section(run) for run in runs),
        f"<footer>{_FOOTER}</footer>",
        "</main></body></html>",
        "",
    ])


def _appendix(appendix: tuple[str, Path | None] | None) -> list[str]:
    if appendix is None:
        return []
    text, plot = appendix
    parts = ['<h2 style="margin-top:28px">Search</h2>', f"<pre>{_e(text)}</pre>"]
    if plot is not None and Path(plot).is_file():
        data = base64.b64encode(Path(plot).read_bytes()).decode("ascii")
        parts.append(f'<figure class="plot"><img src="data:image/png;base64,{data}" alt="parameter '
                     'importances"><figcaption>parameter importances</figcaption></figure>')
    return parts


def check_output(out: Path) -> None:
    """Refuse an ``--out`` that would land on anything but an earlier abawfeat report: a folder, a run's
    file, a cache, a page of the user's."""
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; --out names the HTML file to write")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise ConfigError(f"--out {out}: {blocker} is {what_is(blocker)}, not a folder")
    if out.exists() and not _is_report(out):
        raise ConfigError(f"--out {out}: exists and is not an abawfeat report; report never writes over "
                          "other files (a run's metrics.json, a cache, your page): choose another --out")


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            fh.seek(max(0, path.stat().st_size - 4096))
            tail = fh.read()
    except OSError:
        return False
    return head.startswith(b"<!DOCTYPE html>") and (_GENERATOR.encode() in head or _FOOTER.encode() in tail)


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    make_missing_plots: bool = True,
    title: str = "abawfeat report",
    appendix: tuple[str, Path | None] | None = None,
) -> Path:
    """Write one self-contained HTML report for ``run_dirs`` to ``out`` and return its path.

    Runs without plots get them first (``write_run_plots``) unless ``make_missing_plots`` is false.
    Raises ``DataError`` naming the path for a missing run directory, a missing or invalid metrics.json.
    """
    check_output(Path(out))
    unique: list[Path] = []
    seen: set[Path] = set()
    for run_dir in run_dirs:
        key = Path(run_dir).resolve()
        if key not in seen:  # the same run twice would fake a column clash in the table
            seen.add(key)
            unique.append(Path(run_dir))
    if not unique:
        raise ConfigError("no run directories given")
    runs = [read_run(i, d) for i, d in enumerate(unique, start=1)]  # validate all before any slow work
    for run in runs:
        plot_dir = run.path / PLOTS_DIR
        existing = sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
        if not existing and make_missing_plots:
            existing = write_run_plots(run.path)
        run.plots = _plot_order(existing)
    text = render_report(runs, load_published(), title, appendix)
    return atomic_write_text(out, text)


__all__ = ["DECIMALS", "build_report", "render_report", "table3_rows"]

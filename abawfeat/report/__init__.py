"""Run plots and the HTML comparison report.

- ``write_run_plots(run_dir)``: PNGs into ``<run_dir>/plots/``; called by the trainer at the end of every run
  and never raises for missing or malformed run files (it warns with ``PlotWarning`` and skips the plot).
- ``build_report(run_dirs, out)``: one self-contained HTML file (Table 3 layout, published reference rows,
  one section per run with its plots embedded). See docs/reports.md.
"""

from __future__ import annotations

from abawfeat.report.html import build_report
from abawfeat.report.plots import PlotWarning, expected_plots, write_run_plots

__all__ = ["PlotWarning", "build_report", "expected_plots", "write_run_plots"]

"""Reports a person reads: ranked-state tables, removal-frequency plots (the paper's Fig. 3),
a heatmap of H. Every method's output is a `Ranking`, so nothing here is method-specific."""

from __future__ import annotations

from cboprune.report.tables import rankings_markdown, write_report
from cboprune.report.plots import plot_hessian, plot_removal_frequency

__all__ = ["plot_hessian", "plot_removal_frequency", "rankings_markdown", "write_report"]

"""Rendering a run's records: tables, plots, the papers' layouts, exports, comparisons."""

"""The names of the figures drawn of a table, kept apart from varkd/plots.py (which draws each with the function
of its name): the Snakefile reads them through varkd.study on every run, and plots.py imports matplotlib."""

FIGURES = ("metrics", "curves", "cost", "samples", "diagnostics")  # drawn of every table
SWEEPS = "sweeps"  # drawn of a table holding sweep runs

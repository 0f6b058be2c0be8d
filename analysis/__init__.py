"""Load results into pandas, fit, predict, project and cross-check."""
from analysis.load import load  # noqa: F401

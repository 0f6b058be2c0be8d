"""Load results into pandas, fit, predict, project and cross-check."""
from .load import load  # noqa: F401

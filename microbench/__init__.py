"""llm-microbench: component microbenchmarks for 3D-parallel LLM training."""
import os as _os

__version__ = "0.1.0"

# c10d's C++ warnings (a socket poll that timed out, a store retry) would turn a one-line
# error into several; errors still print. Set before torch loads; a user's value wins.
_os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

"""llm-microbench: component microbenchmarks for 3D-parallel LLM training."""
__version__ = "0.1.0"

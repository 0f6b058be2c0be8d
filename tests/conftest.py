
def pytest_configure(config):
    # A plain `pytest` run does not run the benchmarks; `pytest --benchmark-only` does.
    opt = config.option
    if hasattr(opt, "benchmark_skip") and not getattr(opt, "benchmark_only", False):
        opt.benchmark_skip = True

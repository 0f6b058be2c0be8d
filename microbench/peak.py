"""Peak references: a large square GEMM in the model dtype and a large device copy.

    mpiexec -n 2 python -m microbench.peak --model alcf-1t
    python -m microbench.peak -d bf16 --peak-size 8192 --copy-bytes 1G --concurrent one

They are the measured compute and memory ceilings of the device (every rank busy with
``--concurrent all``, as in a step), the denominators of every efficiency figure: the GEMM
is compute-bound (2·N³ FLOP on 3·N² elements), the copy memory-bound (reads and writes each
byte once: bytes_moved = 2·size). Both land in the manifest as ``peak_tflops`` (per dtype)
and ``peak_gbps``. The buffers are sized far beyond any cache (128 MiB on a CPU, 1 GiB on a
GPU against ≤ 50 MB of H100 L2 and 408 MB of Max 1550 L2 per GPU).
"""
from __future__ import annotations


from .compute import ComputeProbe, Work, count_not_close, randn
from .config import dtype_bytes
from .harness import Case, Context, main_for, parse_size


def _on_cpu(ctx: Context) -> bool:
    return ctx.world.device_kind == "cpu"


def gemm_peak_case(probe: ComputeProbe, ctx: Context) -> Case:
    n = ctx.args.peak_size or (2048 if _on_cpu(ctx) else 8192)
    case = probe.case(ctx, f"peak-gemm-{n}", kind="gemm", op="peak", phase="fwd", m=n, n=n, k=n,
                      batch=1, dtype=ctx.args.dtype, flop=2 * n ** 3)
    case.fields["scale"] = 1.0  # a device ceiling: never scaled
    case.fields["statistic"] = "min"  # a ceiling is the best the device did, not the typical
    return case


def copy_peak_case(probe: ComputeProbe, ctx: Context) -> Case:
    size = parse_size(ctx.args.copy_bytes) if ctx.args.copy_bytes else \
        (128 << 20 if _on_cpu(ctx) else 1 << 30)
    count = size // dtype_bytes(ctx.args.dtype)
    case = probe.case(ctx, f"peak-copy-{size}", kind="memop", op="copy", phase="fwd",
                      count=count, size_bytes=count * dtype_bytes(ctx.args.dtype),
                      dtype=ctx.args.dtype, bytes_moved=2 * count * dtype_bytes(ctx.args.dtype))
    case.fields["scale"] = 1.0
    case.fields["statistic"] = "min"  # a ceiling is the best the device did, not the typical
    return case


def setup_peak(ctx: Context, case: Case, *, seed: int) -> Work:
    import torch
    f, dev = case.fields, ctx.device
    if f["op"] == "copy":
        src = randn((f["count"],), seed=seed, dtype=f["dtype"], device=dev)
        dst = torch.empty_like(src)

        def check() -> tuple[int, int]:
            return int((dst != src).sum().item()), f["count"]
        return Work(lambda: dst.copy_(src), check)
    n = f["m"]
    a = randn((n, n), seed=seed, dtype=f["dtype"], device=dev)
    b = randn((n, n), seed=seed + 1000, dtype=f["dtype"], device=dev)
    c = torch.empty((n, n), dtype=a.dtype, device=dev)

    def check() -> tuple[int, int]:
        rows = min(n, 16)
        a64, b64 = a[:rows].double(), b.double()
        return count_not_close(c[:rows], a64 @ b64, dtype=f["dtype"], bound=a64.abs() @ b64.abs(),
                               terms=n), rows * n
    return Work(lambda: torch.mm(a, b, out=c), check)


class Peak(ComputeProbe):
    name = "peak"
    module = "microbench.peak"
    description = __doc__.splitlines()[0]
    columns = (("op", "op", ">5"), ("type", "dtype", ">5"), ("size", "m", ">6d"),
               ("count", "count", ">11d"), ("time(us)", "time_us", ">11.1f"),
               ("TFLOP/s", "tflops", ">9.2f"), ("GB/s", "gbps", ">9.2f"),
               ("%spec", "pct_spec_peak", ">6.1f"), ("#wrong", "num_wrong", ">6d"))

    def standalone(self, args) -> bool:
        return True

    def peak_cases(self, ctx: Context):
        yield gemm_peak_case(self, ctx)
        yield copy_peak_case(self, ctx)

    def op_cases(self, ctx: Context):
        return iter(())


if __name__ == "__main__":
    main_for(Peak())

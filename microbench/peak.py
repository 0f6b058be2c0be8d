"""Peak references: a large square GEMM in the model dtype and a large device copy.

    mpiexec -n 2 python -m microbench.peak --model alcf-1t
    python -m microbench.peak -d bf16 --peak-size 8192 --copy-bytes 1G --concurrent one

They are the measured compute and memory ceilings of the device (every rank busy with
``--concurrent all``, as in a step), the denominators of every efficiency figure: the GEMM
is compute-bound (2·N³ FLOP on 3·N² elements), the copy memory-bound (reads and writes each
byte once: bytes_moved = 2·size). Both land in the manifest as ``peak_tflops`` (per dtype)
and ``peak_gbps``. The buffers are sized far beyond any cache (128 MiB on a CPU, 1 GiB on a
GPU against ≤ 50 MB of H100 L2 and 408 MB of Max 1550 L2 per GPU). The two cases are
defined in :mod:`microbench.harness.compute` (every compute probe measures its denominator first);
this module only runs them alone.
"""
from __future__ import annotations

from microbench.harness.compute import ComputeProbe, copy_peak_case, gemm_peak_case
from microbench.harness.contract import Context
from microbench.harness.engine import main_for


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

"""pytest-benchmark kernel benchmarks (not part of the test suite: run them on purpose).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only  # DiT shapes on a GPU, small ones on a CPU

On a GPU every provider of `bench_kernels.providers` is timed at DiT-XL/2 shapes (batch 16),
after a correctness check: the `reference` provider against the independent float64 oracle of
``tests/kernels/oracle.py`` (it cannot be checked against itself), every other provider against
the fp32 reference (``bench_kernels.validate``). Without a GPU the `reference` and the plain-torch
`torch_eager` providers run, at small shapes, with the same checks; the others skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import bench_kernels as bk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
import oracle  # noqa: E402  (tests/kernels/oracle.py: float64 formulations independent of reference.py)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

if HAS_CUDA:
    CASES = bk.model_cases(batches=(16,), dtype=DTYPE, device=DEVICE)
else:  # small shapes, one per registered op: the CPU only checks that the harness works
    CASES = [bk.Case(op, spec.tiny_shape, DTYPE, DEVICE) for op, spec in bk.CASES.items()]

PROVIDERS = sorted({name for op in bk.CASES for name in bk.providers(op)})
CPU_PROVIDERS = ("reference", "torch_eager")  # plain torch; torch_compile's CPU codegen takes minutes
TOLERANCE = 2e-2 if DTYPE == torch.bfloat16 else 1e-5


def oracle_error(case, fn, inputs) -> float:
    """Relative error of ``fn`` against the float64 oracle of the same (dtype-exact) inputs."""
    return bk.relative_error(fn(*inputs), getattr(oracle, case.op)(*inputs))


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_kernel(benchmark, case, provider):
    fns = bk.providers(case.op)
    if provider not in fns:
        pytest.skip(f"{case.op} has no {provider} provider")
    if not HAS_CUDA and provider not in CPU_PROVIDERS:
        pytest.skip(f"needs CUDA: only {CPU_PROVIDERS} are timed on the CPU")
    fn = fns[provider]
    inputs = bk.make_inputs(case)
    if provider == "reference":  # validate() would compare the reference with itself
        err = oracle_error(case, fn, inputs)
        assert err < TOLERANCE, f"reference rel err {err:.2e} against the float64 oracle"
    elif provider != "cublas_linear":
        err = bk.validate(case, fn, inputs)
        assert err < TOLERANCE, f"{provider} rel err {err:.2e}"

    def run():
        fn(*inputs)
        _sync()

    benchmark(run)
    benchmark.extra_info.update(
        gbps=bk.bytes_moved(case) / benchmark.stats["median"] / 1e9,
        tflops=bk.flops(case) / benchmark.stats["median"] / 1e12,
    )

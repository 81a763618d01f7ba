"""pytest-benchmark kernel benchmarks (not part of the test suite: run them on purpose).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only              # GPU: DiT shapes
    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only -k reference # CPU smoke

On a GPU every provider of `bench_kernels.providers` is timed at DiT-XL/2 shapes (batch 16),
after a correctness check against the fp32 reference. Without a GPU only the `reference`
provider runs, at a small shape, so the file stays runnable everywhere; other providers skip.
"""

from __future__ import annotations

import pytest
import torch

import bench_kernels as bk

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

if HAS_CUDA:
    CASES = bk.dit_cases(batches=(16,), dtype=DTYPE, device=DEVICE)
else:  # small shapes: the CPU only checks that the harness works
    CASES = [bk.Case("ln_modulate", (2, 16, 72), DTYPE, DEVICE),
             bk.Case("gated_residual_ln_modulate", (2, 16, 72), DTYPE, DEVICE),
             bk.Case("linear_gelu", (32, 72, 64), DTYPE, DEVICE),
             bk.Case("linear_gated_residual", (2, 16, 64, 72), DTYPE, DEVICE),
             bk.Case("attention", (2, 16, 2, 32), DTYPE, DEVICE)]

PROVIDERS = ["reference", "torch_eager", "torch_compile", "cublas_linear", "vendor", "triton", "cuda",
             "sdpa_auto", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_kernel(benchmark, case, provider):
    fns = bk.providers(case.op)
    if provider not in fns:
        pytest.skip(f"{case.op} has no {provider} provider")
    if not HAS_CUDA and provider != "reference":
        pytest.skip("needs CUDA: only the reference provider is timed on the CPU")
    fn = fns[provider]
    inputs = bk.make_inputs(case)
    if provider != "cublas_linear":
        err = bk.validate(case, fn, inputs)
        assert err < (2e-2 if DTYPE == torch.bfloat16 else 1e-5), f"{provider} rel err {err:.2e}"

    def run():
        fn(*inputs)
        _sync()

    benchmark(run)
    benchmark.extra_info.update(
        gbps=bk.bytes_moved(case) / benchmark.stats["median"] / 1e9,
        tflops=bk.flops(case) / benchmark.stats["median"] / 1e12,
    )

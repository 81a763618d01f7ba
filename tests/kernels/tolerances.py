"""Tolerances shared by the kernel tests (each test file says why they fit its op).

Every output is compared with the fp32 reference of the same (dtype-exact) inputs. A kernel that
computes in fp32 and rounds once is within 1 ulp of that: 2**-7 |v| in bf16, 2**-10 |v| in fp16
(the interpreter truncates instead of rounding, still 1 ulp). rtol allows 2 ulps; atol covers
outputs that round to about 0.
"""

import pytest
import torch

BF16_REL = 2.0**-7
FP16_REL = 2.0**-10

#: "dtype, atol, rtol" triples for kernels that accumulate in fp32 and round once.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 2 * BF16_REL, id="bf16"),
    pytest.param(torch.float16, 1e-5, 2 * FP16_REL, id="fp16"),
]


def fp32_gemm_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case difference between two fp32 evaluations of ``x @ w.T`` in any summation order.

    Each order is within ``K * 2**-24 * (|x| @ |w|.T)`` of the exact product (the classical
    bound for a K-term dot product), so two orders (two tile configs, two BLAS core types)
    differ by at most twice that. Returned in float64, shape ``(..., N)``.
    """
    K = x.shape[-1]
    return 2 * K * 2.0**-24 * (x.double().abs() @ w.double().abs().T)


def assert_within_gemm_bound(a: torch.Tensor, c: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Assert ``|a - c| <= bound`` elementwise (plus one output ulp each), reporting the worst element.

    Used where two kernel configs must agree: bitwise equality would hold on a GPU but not on
    the CPU interpreter, whose numpy matmul rounds differently per tile shape and per BLAS core
    type (seen with OPENBLAS_CORETYPE=Haswell).
    """
    a64, c64 = a.double().cpu(), c.double().cpu()
    limit = bound.cpu() + 2.0**-24 * (a64.abs() + c64.abs())
    excess = (a64 - c64).abs() - limit
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: |diff| {(a64 - c64).abs().flatten()[worst].item():.3e} exceeds the fp32 GEMM bound "
        f"{limit.flatten()[worst].item():.3e} at flat index {worst}")

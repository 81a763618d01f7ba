"""residual_layer_norm: h = res + y, normed = LN(h) * weight + bias (an SD/SDXL block's residual add
fused with the next norm), Triton kernel against the reference and the float64 oracle.

The launcher is compared with ``reference.residual_layer_norm_ref`` and ``oracle.residual_layer_norm``
(float64 add + ``F.layer_norm``); the public op (every backend) with the oracle only.
"""

from __future__ import annotations

import random

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import residual_layer_norm_ref
from tolerances import DTYPE_TOLS
from triton_backend import triton_or_skip

OP = "residual_layer_norm"
FP32_BF16 = DTYPE_TOLS[:2]

# SDXL widths 640 / 1280, odd and prime widths, D = 1, one-row inputs, a one-column tail, no tail.
SHAPES = [(2, 7, 640), (3, 1280), (1, 1, 1000), (2, 3, 13), (5, 1), (3, 1, 1025), (1, 2, 8192), (2, 2, 3, 72)]
_rng = random.Random(17)
RANDOM_SHAPES = [(_rng.randint(1, 40), _rng.randint(1, 3000)) for _ in range(6)]


def make_inputs(shape, dtype, device, weight=True, bias=True):
    D = shape[-1]
    res = (torch.randn(shape) * 2 + 0.5).to(device, dtype)
    y = torch.randn(shape).to(device, dtype)
    w = (1 + 0.5 * torch.randn(D)).to(device, dtype) if weight else None
    b = torch.randn(D).to(device, dtype) if bias else None
    return res, y, w, b


def _check_pair(got, want, atol, rtol, check_close, what):
    for name, g, w in zip(("h", "normed"), got, want):
        check_close(g, w, atol, rtol, f"{what}: {name}")


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("shape", SHAPES + RANDOM_SHAPES, ids=str)
def test_triton_matches_reference_and_oracle(shape, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    res, y, w, b = make_inputs(shape, dtype, device)
    got = triton_kernels.residual_layer_norm_triton(res, y, w, b, 1e-5)
    assert all(t.dtype == dtype and t.shape == res.shape for t in got)
    _check_pair(got, oracle.residual_layer_norm(res, y, w, b), atol, rtol, check_close, f"{OP} vs oracle {shape}")
    _check_pair(got, residual_layer_norm_ref(res, y, w, b), atol, rtol, check_close, f"{OP} vs reference {shape}")


@pytest.mark.parametrize("has_weight, has_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_optional_affine(has_weight, has_bias, check_close):
    triton_kernels, device = triton_or_skip()
    res, y, w, b = make_inputs((3, 5, 640), torch.float32, device, has_weight, has_bias)
    _check_pair(triton_kernels.residual_layer_norm_triton(res, y, w, b), oracle.residual_layer_norm(res, y, w, b),
                1e-5, 1e-5, check_close, "optional affine")


def test_the_norm_reads_the_unrounded_sum(check_close):
    """bf16: normed is LN of the fp32 res + y, not of the bf16-rounded h (as the reference says)."""
    triton_kernels, device = triton_or_skip()
    res, y, w, b = make_inputs((4, 9, 640), torch.bfloat16, device)
    h, normed = triton_kernels.residual_layer_norm_triton(res, y, w, b)
    from_fp32 = oracle.residual_layer_norm(res, y, w, b)[1]
    from_rounded = oracle.layer_norm(h, w, b)
    assert (normed.double() - from_fp32).abs().max() <= (normed.double() - from_rounded).abs().max() + 1e-3


def test_the_branch_is_added_and_stored(check_close):
    """Mutants ignoring y, or storing res instead of h, fail the comparison."""
    triton_kernels, device = triton_or_skip()
    res, y, w, b = make_inputs((2, 3, 72), torch.float32, device)
    h, normed = triton_kernels.residual_layer_norm_triton(res, y, w, b)
    assert not torch.allclose(normed, oracle.layer_norm(res, w, b).float(), atol=1e-2)
    check_close(h, res.double() + y.double(), 1e-6, 1e-6, "h")


def test_launcher_refuses_bad_inputs():
    triton_kernels, device = triton_or_skip()
    res, y, w, b = make_inputs((2, 3, 72), torch.float32, device)
    with pytest.raises(AssertionError, match="bad res/y"):
        triton_kernels.residual_layer_norm_triton(res, y[:1], w, b)
    with pytest.raises(AssertionError, match="bad weight/bias"):
        triton_kernels.residual_layer_norm_triton(res, y, w[:71], b)


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("shape", [(2, 7, 640), (3, 1, 1025), (2, 3, 13)], ids=str)
def test_public_op_matches_oracle(backend, device, shape, dtype, atol, rtol, check_close):
    res, y, w, b = make_inputs(shape, dtype, device)
    got = mk.residual_layer_norm(res, y, w, b, 1e-5)
    _check_pair(got, oracle.residual_layer_norm(res, y, w, b), atol, rtol, check_close, f"{OP}[{backend}] {shape}")


@pytest.mark.parametrize("res_shape, y_shape, w_shape, dtype, error", [
    ((2, 5, 72), (2, 5, 71), (72,), torch.float32, ValueError),
    ((2, 5, 72), (2, 5, 72), (71,), torch.float32, ValueError),
    ((2, 5, 72), (2, 5, 72), (72,), torch.float64, TypeError),
], ids=["y-shape", "weight-width", "float64"])
def test_public_op_bad_inputs_raise(res_shape, y_shape, w_shape, dtype, error):
    with pytest.raises(error):
        mk.residual_layer_norm(torch.zeros(res_shape, dtype=dtype), torch.zeros(y_shape, dtype=dtype),
                               torch.zeros(w_shape, dtype=dtype), None, 1e-5)
    with pytest.raises(TypeError, match="dtype"):
        mk.residual_layer_norm(torch.zeros(2, 72), torch.zeros(2, 72, dtype=torch.bfloat16), None, None)

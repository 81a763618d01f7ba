"""layer_norm: y = LN(x) * weight + bias (SDXL's transformer norms), Triton kernel against the
reference and the float64 oracle (``F.layer_norm`` with its own affine).

The Triton launcher is compared with both ``reference.layer_norm_ref`` (fp32, what the torch
backend returns) and ``oracle.layer_norm`` (an independent float64 formulation); the public op
``mk.layer_norm`` (every backend) with the oracle only, since its torch backend *is* the reference.
"""

from __future__ import annotations

import random

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import layer_norm_ref

OP = "layer_norm"

# (..., D): SDXL widths 640 (512 + 128) and 1280 (1024 + 256), odd and prime widths, D = 1 and 2,
# a 2-D and a 4-D x, one-row inputs, 8192 (no tail), 1025 (a one-column tail).
SHAPES = [
    (2, 7, 640),
    (3, 1280),
    (1, 1, 1000),
    (2, 3, 13),
    (5, 1),
    (1, 3, 2),
    (3, 1, 1025),
    (1, 2, 8192),
    (2, 2, 3, 72),
]
# Randomized shapes (fixed seed, so a failure reproduces): rows 1..40, D 1..3000.
_rng = random.Random(9)
RANDOM_SHAPES = [(_rng.randint(1, 40), _rng.randint(1, 3000)) for _ in range(6)]

# fp32: only the order of the D-term mean/variance sums differs from the reference, a few fp32
# ulps of O(1) outputs -> 1e-5. bf16: the kernel computes in fp32 and rounds once (the
# interpreter truncates), within 1 ulp <= 2**-7 |v| of the fp32 value; rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS  # noqa: E402
from triton_backend import triton_or_skip  # noqa: E402

FP32_BF16 = DTYPE_TOLS[:2]
AFFINE = [pytest.param(True, True, id="affine"), pytest.param(False, False, id="no-affine"),
          pytest.param(True, False, id="weight-only"), pytest.param(False, True, id="bias-only")]


def make_inputs(shape, dtype, device, weight=True, bias=True):
    D = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype)
    w = (1 + 0.5 * torch.randn(D)).to(device, dtype) if weight else None
    b = torch.randn(D).to(device, dtype) if bias else None
    return x, w, b


def _public_op_or_skip():
    if not hasattr(mk, "layer_norm"):
        pytest.skip("mosaic_kernels.layer_norm is not registered yet")
    return mk.layer_norm


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("shape", SHAPES + RANDOM_SHAPES, ids=str)
def test_triton_matches_reference_and_oracle(shape, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs(shape, dtype, device)
    y = triton_kernels.layer_norm_triton(x, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    check_close(y, oracle.layer_norm(x, w, b, 1e-5), atol, rtol, f"{OP} vs oracle {shape} {dtype}")
    check_close(y, layer_norm_ref(x, w, b, 1e-5), atol, rtol, f"{OP} vs reference {shape} {dtype}")


@pytest.mark.parametrize("has_weight, has_bias", AFFINE)
@pytest.mark.parametrize("D", [72, 640, 2301])
def test_optional_affine(D, has_weight, has_bias, check_close):
    """weight/bias None (``elementwise_affine=False``, ``bias=False``) leave their term out."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((3, 5, D), torch.float32, device, has_weight, has_bias)
    y = triton_kernels.layer_norm_triton(x, w, b, 1e-5)
    check_close(y, oracle.layer_norm(x, w, b, 1e-5), 1e-5, 1e-5, f"{OP} D={D} weight={has_weight} bias={has_bias}")


def test_tolerance_rejects_missing_bias(check_close):
    """Negative control: the fp32 tolerance catches a bias of 1e-3 left out."""
    x, w, b = make_inputs((2, 3, 72), torch.float32, "cpu")
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(layer_norm_ref(x, w, None), oracle.layer_norm(x, w, torch.full_like(b, 1e-3)), 1e-5, 1e-5, "control")


@pytest.mark.parametrize("D", [1, 13, 1152, 2301])
def test_block_m_sweep_and_no_store_past_the_rows(D, check_close):
    """Every BLOCK_M (9 rows: 2, 4 and 8 leave a partial last tile) is right, and writes nothing
    past ``out`` (the head of a larger buffer whose rest keeps its sentinel)."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((3, 3, D), torch.float32, device)
    expected = oracle.layer_norm(x, w, b, 1e-5)
    for block_m in (1, 2, 4, 8, 16):
        buf = torch.full((9 * D + 4096,), -7.0, device=device)
        out = buf[:9 * D].view(3, 3, D)
        triton_kernels.layer_norm_triton(x, w, b, 1e-5, out=out, config={"BLOCK_M": block_m})
        assert bool((buf[9 * D:] == -7.0).all()), f"BLOCK_M={block_m}: stored past the rows"
        check_close(out, expected, 1e-5, 1e-5, f"{OP} D={D} BLOCK_M={block_m}")


def test_tail_statistics_matter(check_close):
    """Rows whose tail columns (1024..1279 of 1280) have another mean and spread: a norm that
    dropped the tail from the statistics would be far off."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((1, 3, 1280), torch.float32, device)
    x[..., 1024:] = 4.0 + 3.0 * x[..., 1024:]
    check_close(triton_kernels.layer_norm_triton(x, w, b, 1e-5, config={"BLOCK_M": 2}),
                oracle.layer_norm(x, w, b, 1e-5), 1e-5, 1e-5, "tail statistics")


def test_mixed_dtypes_bf16_x_fp32_affine(check_close):
    """bf16 activations with fp32 weight/bias: the output keeps x's dtype."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((2, 4, 640), torch.bfloat16, device)
    y = triton_kernels.layer_norm_triton(x, w.float(), b.float(), 1e-5)
    assert y.dtype == torch.bfloat16
    check_close(y, oracle.layer_norm(x, w.float(), b.float(), 1e-5), 1e-5, 2 * BF16_REL, "mixed dtypes")


def test_eps_is_used(check_close):
    """Constant rows normalize to 0 only through eps: a large eps shrinks a small spread."""
    triton_kernels, device = triton_or_skip()
    x = torch.randn(2, 3, 72, device=device) * 1e-2
    for eps in (1e-5, 1e-1):
        check_close(triton_kernels.layer_norm_triton(x, None, None, eps), oracle.layer_norm(x, None, None, eps),
                    1e-5, 1e-5, f"eps={eps}")


def test_nonfinite_propagate_as_the_reference():
    """An inf or NaN in a row makes that row NaN (inf - inf in the centering); an inf weight
    column gives +-inf there; other rows and columns stay finite and right."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((1, 6, 1152), torch.float32, device)
    x[0, 1, 5] = float("inf")
    x[0, 2, 1100] = float("nan")  # in the tail chunk
    x[0, 3, 0] = -float("inf")
    w[7] = float("inf")
    y = triton_kernels.layer_norm_triton(x, w, b, 1e-5)
    ref = layer_norm_ref(x, w, b, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.isnan(y[0, 1:4]).all() and torch.isinf(y[0, [0, 4, 5], 7]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], atol=1e-5, rtol=1e-5)
    expected = oracle.layer_norm(x, w, b, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))


def test_launcher_refuses_bad_inputs():
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs((2, 3, 72), torch.float32, device)
    with pytest.raises(AssertionError, match="contiguous"):
        triton_kernels.layer_norm_triton(x.transpose(0, 1), w, b)
    with pytest.raises(AssertionError, match="bad weight/bias"):
        triton_kernels.layer_norm_triton(x, w[:71], b)
    with pytest.raises(AssertionError, match="bad out"):
        triton_kernels.layer_norm_triton(x, w, b, out=torch.empty_like(x, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# The public op (registered by mosaic_kernels.ops): every backend against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("shape", [(2, 7, 640), (3, 1, 1025), (2, 3, 13)], ids=str)
def test_public_op_matches_oracle(backend, device, shape, dtype, atol, rtol, check_close):
    layer_norm = _public_op_or_skip()
    x, w, b = make_inputs(shape, dtype, device)
    y = layer_norm(x, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    check_close(y, oracle.layer_norm(x, w, b, 1e-5), atol, rtol, f"{OP}[{backend}] {shape} {dtype}")
    check_close(layer_norm(x, None, None, 1e-5), oracle.layer_norm(x, None, None, 1e-5), atol, rtol,
                f"{OP}[{backend}] no affine")


@pytest.mark.parametrize(
    "x_shape, w_shape, dtype",
    [((2, 5, 72), (71,), torch.float32), ((2, 5, 72), (72,), torch.float64), ((2, 5, 72), (2, 72), torch.float32)],
    ids=["weight-width", "float64", "weight-2d"],
)
def test_public_op_bad_inputs_raise(x_shape, w_shape, dtype):
    layer_norm = _public_op_or_skip()
    with pytest.raises((ValueError, TypeError)):
        layer_norm(torch.zeros(x_shape, dtype=dtype), torch.zeros(w_shape, dtype=dtype), None, 1e-5)

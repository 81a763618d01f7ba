"""linear_geglu: diffusers GEGLU ``h, g = (x @ W.T + b).chunk(2, -1); h * gelu(g)`` (exact erf GELU),
the Triton GEMM against the reference and the float64 oracle.

The Triton launcher is compared with both ``reference.linear_geglu_ref`` (fp32) and
``oracle.linear_geglu`` (float64, ``F.gelu``); the public op ``mk.linear_geglu`` (every backend)
with the oracle only, since its torch backend *is* the reference.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import gelu_erf_ref, linear_geglu_ref

OP = "linear_geglu"
HAS_CUDA = torch.cuda.is_available()

# (M, K, inner): interpreter-sized (M <= 130, K <= 200, 2 * inner <= 400); odd and prime sizes
# cover the masked M, N and K tails of 64-wide tiles, inner = 1 a single output column.
SHAPES = [(130, 72, 100), (7, 200, 48), (1, 33, 17), (65, 64, 64), (3, 16, 1)]
_rng = random.Random(11)
RANDOM_SHAPES = [(_rng.randint(1, 100), _rng.randint(1, 150), _rng.randint(1, 120)) for _ in range(4)]

# Weights scaled by 1/sqrt(K): pre-activations O(1). fp32: the K-term dots differ from the
# reference in summation order (~K * 2**-24 * sum|x*w|, ~1e-6) and the erf GELU by a few ulps,
# -> 1e-5. bf16: exact operands, fp32 accumulation and epilogue, one rounding of the output
# (truncated in the interpreter): <= 1 ulp <= 2**-7 |v|; rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, assert_within_gemm_bound, fp32_gemm_bound  # noqa: E402
from triton_backend import triton_or_skip  # noqa: E402

FP32_BF16 = DTYPE_TOLS[:2]
TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3}


def make_inputs(M, K, inner, dtype, device, bias=True):
    x = torch.randn(M, K).to(device, dtype)
    w = (torch.randn(2 * inner, K) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(2 * inner).to(device, dtype) if bias else None
    return x, w, b


def _public_op_or_skip():
    if not hasattr(mk, "linear_geglu"):
        pytest.skip("mosaic_kernels.linear_geglu is not registered yet")
    return mk.linear_geglu


def test_reference_is_diffusers_geglu():
    """The reference equals diffusers' formula (chunk, then ``F.gelu`` with erf), not tanh-GELU."""
    x, w, b = make_inputs(5, 24, 16, torch.float32, "cpu")
    h, gate = F.linear(x, w, b).chunk(2, dim=-1)
    torch.testing.assert_close(linear_geglu_ref(x, w, b), h * F.gelu(gate), atol=1e-6, rtol=1e-6)
    z = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(gelu_erf_ref(z), F.gelu(z), atol=1e-6, rtol=1e-6)
    assert (gelu_erf_ref(z) - F.gelu(z, approximate="tanh")).abs().max() > 1e-4


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("M, K, inner", SHAPES + RANDOM_SHAPES, ids=str)
def test_triton_matches_reference_and_oracle(M, K, inner, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs(M, K, inner, dtype, device)
    y = triton_kernels.linear_geglu_triton(x, w, b)
    assert y.dtype == dtype and y.shape == (M, inner)
    check_close(y, oracle.linear_geglu(x, w, b), atol, rtol, f"{OP} vs oracle {(M, K, inner)} {dtype}")
    check_close(y, linear_geglu_ref(x, w, b), atol, rtol, f"{OP} vs reference {(M, K, inner)} {dtype}")


def test_no_bias_and_transposed_weight(check_close):
    """No bias; a weight that is a transposed (column-major) view is read through its strides."""
    triton_kernels, device = triton_or_skip()
    x, w, _ = make_inputs(9, 40, 24, torch.float32, device, bias=False)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    check_close(triton_kernels.linear_geglu_triton(x, w_t, None), oracle.linear_geglu(x, w, None), 1e-5, 1e-5,
                f"{OP} strided weight, no bias")


def test_tolerance_rejects_swapped_halves(check_close):
    """Negative control: gating the gate half by the value half (halves swapped) is caught."""
    x, w, b = make_inputs(4, 40, 24, torch.float32, "cpu")
    swapped = torch.cat([w[24:], w[:24]]), torch.cat([b[24:], b[:24]])
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(linear_geglu_ref(x, *swapped), oracle.linear_geglu(x, w, b), 1e-5, 1e-5, "negative control")


def test_two_configs_agree():
    """Different M/N tiling and group order with the same BLOCK_K agree: bitwise on a GPU, within
    the fp32 summation-order bound on the CPU interpreter (GELU is 1.13-Lipschitz, and the value
    half multiplies: the bound covers both accumulators)."""
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs(130, 96, 50, torch.float32, device)
    base = {"BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    a = triton_kernels.linear_geglu_triton(x, w, b, config={**base, "BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 1})
    c = triton_kernels.linear_geglu_triton(x, w, b, config={**base, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})
    if device.type == "cuda":
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=lambda m: f"tile configs differ: {m}")
    else:
        pre = oracle.linear(x, w, b)
        value, gate = pre.chunk(2, dim=-1)
        bv, bg = fp32_gemm_bound(x, w).chunk(2, dim=-1)
        bound = 1.13 * value.abs() * bg + F.gelu(gate).abs() * bv + 1.13 * bv * bg
        assert_within_gemm_bound(a, c, bound, "tile configs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, K, inner, uses_tma", [(130, 64, 72, True), (70, 40, 17, False)], ids=str)
def test_tensor_descriptor_variant(M, K, inner, uses_tma, dtype, monkeypatch, check_close):
    """The TMA-descriptor path (value rows past ``inner`` read gate rows, never stored) matches the
    reference; unaligned rows (inner = 17) fall back to the pointer loop."""
    triton_kernels, device = triton_or_skip()
    from mosaic_kernels.triton import _matmul

    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper (sm_90+)")
    x, w, b = make_inputs(M, K, inner, dtype, device)
    launched = []
    make_descriptor = _matmul.make_descriptor
    monkeypatch.setattr(_matmul, "make_descriptor", lambda t, block: launched.append(block) or make_descriptor(t, block))
    with_tma = triton_kernels.linear_geglu_triton(x, w, b, config={**TILE, "tma": True})
    assert bool(launched) == uses_tma
    plain = triton_kernels.linear_geglu_triton(x, w, b, config=TILE)
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_REL
    if device.type == "cuda":
        torch.testing.assert_close(with_tma, plain, atol=0, rtol=0, msg=lambda m: f"TMA vs pointer kernel: {m}")
    check_close(with_tma, linear_geglu_ref(x.float(), w.float(), b.float()), 1e-5, rtol, "TMA variant")
    check_close(with_tma, oracle.linear_geglu(x, w, b), 1e-5, rtol, "TMA variant vs oracle")


def test_nonfinite_propagate_as_the_reference():
    """Pre-activations of +-inf and NaN (through the bias, over zero weight rows, so the product is
    exact): gelu(+inf) = +inf, gelu(-inf) = NaN (-inf * 0), inf * gelu(0) = NaN; an inf in x
    spreads over its row as IEEE sums say (the oracle's exact product). All as the reference."""
    triton_kernels, device = triton_or_skip()
    inner, K = 8, 16
    x, w, b = make_inputs(5, K, inner, torch.float32, device)
    w[:4] = 0.0
    w[inner:inner + 4] = 0.0
    inf, nan = float("inf"), float("nan")
    b[:4] = torch.tensor([1.0, inf, -inf, nan])  # value pre-activations of columns 0..3
    b[inner:inner + 4] = torch.tensor([inf, 0.0, -inf, 2.0])  # gate pre-activations
    x[3, 2] = inf
    y = triton_kernels.linear_geglu_triton(x, w, b, config=TILE)
    ref = linear_geglu_ref(x, w, b)
    expected = oracle.linear_geglu(x, w, b, exact_gemm=True)
    for want, name in ((ref, "reference"), (expected, "oracle")):
        assert torch.equal(torch.isnan(y), torch.isnan(want)), f"NaN pattern differs from the {name}"
        assert torch.equal(torch.isinf(y), torch.isinf(want)), f"inf pattern differs from the {name}"
    assert torch.isinf(y[[0, 1, 2, 4], 0]).all() and torch.isnan(y[:, 1:4]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], atol=1e-5, rtol=1e-5)


def test_launcher_refuses_bad_inputs():
    triton_kernels, device = triton_or_skip()
    x, w, b = make_inputs(4, 40, 24, torch.float32, device)
    with pytest.raises(AssertionError, match="Incompatible dimensions"):
        triton_kernels.linear_geglu_triton(x, w[:, :39], b)
    with pytest.raises(AssertionError, match="2 \\* inner rows"):
        triton_kernels.linear_geglu_triton(x, w[:47], None)
    with pytest.raises(AssertionError, match="bad bias"):
        triton_kernels.linear_geglu_triton(x, w, b[:24])
    with pytest.raises(AssertionError, match="bad out"):
        triton_kernels.linear_geglu_triton(x, w, b, out=torch.empty(4, 48, device=device))


# ---------------------------------------------------------------------------------------------
# The public op (registered by mosaic_kernels.ops): every backend against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("x_shape, inner", [((2, 65, 72), 100), ((1, 1, 33), 17), ((130, 64), 40)], ids=str)
def test_public_op_matches_oracle(backend, device, x_shape, inner, dtype, atol, rtol, check_close):
    linear_geglu = _public_op_or_skip()
    K = x_shape[-1]
    x = torch.randn(x_shape).to(device, dtype)
    w = (torch.randn(2 * inner, K) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(2 * inner).to(device, dtype)
    y = linear_geglu(x, w, b)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], inner)
    check_close(y, oracle.linear_geglu(x, w, b), atol, rtol, f"{OP}[{backend}] {x_shape}->{inner} {dtype}")


@pytest.mark.parametrize(
    "w_shape, b_shape, dtype",
    [((48, 41), (48,), torch.float32), ((47, 40), None, torch.float32), ((48, 40), (24,), torch.float32),
     ((48, 40), (48,), torch.float64)],
    ids=["K-mismatch", "odd-rows", "bias-width", "float64"],
)
def test_public_op_bad_inputs_raise(w_shape, b_shape, dtype):
    linear_geglu = _public_op_or_skip()
    x = torch.zeros(2, 5, 40, dtype=dtype)
    with pytest.raises((ValueError, TypeError)):
        linear_geglu(x, torch.zeros(w_shape, dtype=dtype), None if b_shape is None else torch.zeros(b_shape, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# The split form: value rows and gate rows as two views (a shared-producer U-Net block's ff1)
# ---------------------------------------------------------------------------------------------

# (M, K, stored channels F_total, run a..b): odd runs at odd offsets, a single channel, the whole storage
SPLIT_SHAPES = [(37, 72, 50, (3, 40)), (5, 33, 17, (16, 17)), (64, 64, 64, (0, 64)), (130, 40, 29, (7, 26))]


def _split_views(M, K, total, run, dtype, device, bias=True):
    """A [value rows | gate rows] storage of `total` channels, and the views of channels a..b."""
    x, storage, b = make_inputs(M, K, total, dtype, device, bias=bias)
    a, e = run
    views = (storage[a:e], None if b is None else b[a:e], storage[total + a:total + e],
             None if b is None else b[total + a:total + e])
    # what the views mean, as one (2 * inner, K) weight (a copy): the oracle's operands
    dense_w = torch.cat([views[0], views[2]])
    dense_b = None if b is None else torch.cat([views[1], views[3]])
    return x, views, dense_w, dense_b


def test_split_views_are_views():
    x, (w, b, wg, bg), _, _ = _split_views(4, 16, 10, (2, 7), torch.float32, "cpu")
    assert w.data_ptr() + 10 * 16 * 4 == wg.data_ptr() and bg.data_ptr() == b.data_ptr() + 10 * 4


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("M, K, total, run", SPLIT_SHAPES, ids=str)
def test_triton_split_gate_matches_oracle(M, K, total, run, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    x, (w, b, wg, bg), dense_w, dense_b = _split_views(M, K, total, run, dtype, device)
    y = triton_kernels.linear_geglu_triton(x, w, b, gate_weight=wg, gate_bias=bg, config=TILE)
    assert y.shape == (M, run[1] - run[0])
    check_close(y, oracle.linear_geglu(x, dense_w, dense_b), atol, rtol, f"{OP} split {(M, K, total, run)} {dtype}")
    check_close(y, linear_geglu_ref(x, w, b, wg, bg), atol, rtol, f"{OP} split vs reference")
    no_bias = triton_kernels.linear_geglu_triton(x, w, None, gate_weight=wg, gate_bias=None, config=TILE)
    check_close(no_bias, oracle.linear_geglu(x, dense_w, None), atol, rtol, f"{OP} split, no bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_tensor_descriptor_variant(dtype, monkeypatch, check_close):
    """The TMA path describes the two views separately (value and gate descriptors)."""
    triton_kernels, device = triton_or_skip()
    from mosaic_kernels.triton import _matmul

    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper (sm_90+)")
    x, (w, b, wg, bg), dense_w, dense_b = _split_views(130, 64, 96, (8, 80), dtype, device)
    described = []
    make_descriptor = _matmul.make_descriptor
    monkeypatch.setattr(_matmul, "make_descriptor",
                        lambda t, block: described.append(t.data_ptr()) or make_descriptor(t, block))
    y = triton_kernels.linear_geglu_triton(x, w, b, gate_weight=wg, gate_bias=bg, config={**TILE, "tma": True})
    assert w.data_ptr() in described and wg.data_ptr() in described
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_REL
    check_close(y, oracle.linear_geglu(x, dense_w, dense_b), 1e-5, rtol, "split TMA variant")


def test_split_tolerance_rejects_a_gate_off_by_one_row(check_close):
    """Negative control: gate rows shifted by one channel (an off-by-one range) are caught."""
    x, (w, b, wg, bg), dense_w, dense_b = _split_views(6, 40, 30, (4, 20), torch.float32, "cpu")
    shifted = linear_geglu_ref(x, w, b, dense_w[16:].roll(1, 0), dense_b[16:].roll(1, 0))
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(shifted, oracle.linear_geglu(x, dense_w, dense_b), 1e-5, 1e-5, "negative control")


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
def test_public_op_split_matches_oracle(backend, device, dtype, atol, rtol, check_close):
    linear_geglu = _public_op_or_skip()
    x, (w, b, wg, bg), dense_w, dense_b = _split_views(70, 48, 40, (5, 38), dtype, device)
    x = x.view(2, 35, 48)
    y = linear_geglu(x, w, b, wg, bg)
    assert y.shape == (2, 35, 33) and y.dtype == dtype
    check_close(y, oracle.linear_geglu(x, dense_w, dense_b), atol, rtol, f"{OP}[{backend}] split {dtype}")


def test_opcheck_both_forms():
    """The schema, the fake (shapes alone) and autograd registration, with and without the gate operands."""
    _public_op_or_skip()
    x, (w, b, wg, bg), dense_w, dense_b = _split_views(6, 24, 20, (3, 15), torch.float32, "cpu")
    op = torch.ops.mosaic.linear_geglu.default
    torch.library.opcheck(op, (x, dense_w, dense_b))
    torch.library.opcheck(op, (x, w, b, wg, bg))
    torch.library.opcheck(op, (x, w, None, wg, None))


def test_split_bad_inputs_raise():
    linear_geglu = _public_op_or_skip()
    x, (w, b, wg, bg), _, _ = _split_views(4, 24, 20, (3, 15), torch.float32, "cpu")
    with pytest.raises(ValueError, match="gate_weight must have"):
        linear_geglu(x, w, b, wg[1:], bg[1:])
    with pytest.raises(ValueError, match="both bias and gate_bias"):
        linear_geglu(x, w, b, wg, None)
    with pytest.raises(ValueError, match="gate_bias needs gate_weight"):
        linear_geglu(x, torch.cat([w, wg]), torch.cat([b, bg]), None, bg)
    with pytest.raises(TypeError, match="dtype"):
        linear_geglu(x, w, b, wg.half(), bg.half())
    with pytest.raises(ValueError, match="last dim"):
        linear_geglu(x, w, b, wg[:, 1:], bg)


def test_split_launcher_refuses_bad_inputs():
    triton_kernels, device = triton_or_skip()
    x, (w, b, wg, bg), _, _ = _split_views(4, 24, 20, (3, 15), torch.float32, device)
    with pytest.raises(AssertionError, match="bad gate_weight"):
        triton_kernels.linear_geglu_triton(x, w, b, gate_weight=wg[1:], gate_bias=bg[1:])
    with pytest.raises(AssertionError, match="both or neither"):
        triton_kernels.linear_geglu_triton(x, w, b, gate_weight=wg, gate_bias=None)
    with pytest.raises(AssertionError, match="gate_bias without gate_weight"):
        triton_kernels.linear_geglu_triton(x, torch.cat([w, wg]), None, gate_bias=bg)

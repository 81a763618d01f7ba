"""linear_residual: ``res + (x @ W.T + b)`` (SD/SDXL out projection / ff2 with its residual add),
the Triton GEMM against the reference and the float64 oracle, every backend of the public op.

The Triton launcher is compared with both ``reference.linear_residual_ref`` (fp32) and
``oracle.linear_residual`` (float64); the public op ``mk.linear_residual`` (every backend) with
the oracle only, since its torch backend *is* the reference. On this CPU the Triton kernel runs
in the interpreter (64-wide tiles: the shapes stay small).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk
import oracle
from mosaic_kernels.ops import _dispatch
from mosaic_kernels.reference import linear_residual_ref

OP = "linear_residual"
HAS_CUDA = torch.cuda.is_available()

# (M, K, N): odd and prime sizes cover the masked M, N and K tails of 64-wide tiles (and of the
# epilogue's 32-wide column halves); N = 1 a single output column, K = 1 a one-term dot.
SHAPES = [(130, 72, 100), (7, 200, 48), (1, 33, 17), (65, 64, 64), (3, 1, 1)]
_rng = random.Random(23)
RANDOM_SHAPES = [(_rng.randint(1, 140), _rng.randint(1, 150), _rng.randint(1, 140)) for _ in range(4)]

# Weights scaled by 1/sqrt(K): O(1) values. fp32: the K-term dot in another summation order
# (~K * 2**-24 * sum|x*w|, ~1e-6) plus one add -> 1e-5. bf16: exact operands, fp32 accumulation
# and epilogue, one rounding of the output (truncated in the interpreter): <= 1 ulp; rtol 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, assert_within_gemm_bound, fp32_gemm_bound  # noqa: E402
from triton_backend import triton_or_skip  # noqa: E402

FP32_BF16 = DTYPE_TOLS[:2]
TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3}


def make_inputs(lead, K, N, dtype, device, bias=True):
    """``(x, weight, bias, res)`` with ``x`` of shape ``(*lead, K)``."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    x = torch.randn(*lead, K).to(device, dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(N).to(device, dtype) if bias else None
    res = torch.randn(*lead, N).to(device, dtype)
    return x, w, b, res


def test_reference_matches_the_oracle_and_diffusers(check_close):
    """The fp32 reference against the float64 oracle, and against diffusers' ``ff(x) + h`` order."""
    x, w, b, res = make_inputs((2, 9), 40, 24, torch.float32, "cpu")
    check_close(linear_residual_ref(x, w, b, res), oracle.linear_residual(x, w, b, res), 1e-5, 1e-5, "ref vs oracle")
    check_close(linear_residual_ref(x, w, b, res), F.linear(x, w, b) + res, 1e-6, 1e-6, "ref vs diffusers")
    xb, wb, bb, rb = (t.bfloat16() for t in (x, w, b, res))
    check_close(linear_residual_ref(xb, wb, None, rb), oracle.linear_residual(xb, wb, None, rb), 1e-5, 2 * BF16_REL,
                "bf16 ref vs oracle")


def test_tolerance_rejects_a_dropped_bias(check_close):
    """Negative control: the residual added without the bias (a plausible epilogue bug) is caught."""
    x, w, b, res = make_inputs(4, 40, 24, torch.float32, "cpu")
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(res + x @ w.T, oracle.linear_residual(x, w, b, res), 1e-5, 1e-5, "negative control")


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("M, K, N", SHAPES + RANDOM_SHAPES, ids=str)
def test_triton_matches_reference_and_oracle(M, K, N, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    x, w, b, res = make_inputs(M, K, N, dtype, device)
    out = triton_kernels.linear_residual_triton(x, w, b, res)
    assert out.dtype == dtype and out.shape == (M, N)
    check_close(out, oracle.linear_residual(x, w, b, res), atol, rtol, f"{OP} vs oracle {(M, K, N)} {dtype}")
    check_close(out, linear_residual_ref(x, w, b, res), atol, rtol, f"{OP} vs reference {(M, K, N)} {dtype}")


def test_no_bias_transposed_weight_and_in_place(check_close):
    """No bias; a column-major weight read through its strides; ``out=res`` updates the stream in place."""
    triton_kernels, device = triton_or_skip()
    x, w, _, res = make_inputs((3, 11), 40, 24, torch.float32, device, bias=False)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    want = oracle.linear_residual(x, w, None, res)
    check_close(triton_kernels.linear_residual_triton(x, w_t, None, res), want, 1e-5, 1e-5, "strided weight")
    stream = res.clone()
    got = triton_kernels.linear_residual_triton(x, w, None, stream, out=stream, config=TILE)
    assert got is stream
    check_close(stream, want, 1e-5, 1e-5, "in place")


def test_two_configs_agree():
    """Different M/N tiling and group order with the same BLOCK_K agree: bitwise on a GPU, within
    the fp32 summation-order bound on the CPU interpreter."""
    triton_kernels, device = triton_or_skip()
    x, w, b, res = make_inputs(130, 96, 100, torch.float32, device)
    base = {"BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    a = triton_kernels.linear_residual_triton(x, w, b, res, config={**base, "BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 1})
    c = triton_kernels.linear_residual_triton(x, w, b, res, config={**base, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})
    if device.type == "cuda":
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=lambda m: f"tile configs differ: {m}")
    else:
        assert_within_gemm_bound(a, c, fp32_gemm_bound(x, w), "tile configs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M, K, N, uses_tma", [(130, 64, 72, True), (70, 40, 17, False)], ids=str)
def test_tensor_descriptor_variant(M, K, N, uses_tma, dtype, monkeypatch, check_close):
    """The TMA-descriptor kernel (residual and output described by column halves) matches the
    reference; unaligned rows (N = 17) fall back to the pointer loop."""
    triton_kernels, device = triton_or_skip()
    from mosaic_kernels.triton import _matmul

    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper (sm_90+)")
    x, w, b, res = make_inputs(M, K, N, dtype, device)
    launched = []
    make_descriptor = _matmul.make_descriptor
    monkeypatch.setattr(_matmul, "make_descriptor", lambda t, block: launched.append(block) or make_descriptor(t, block))
    with_tma = triton_kernels.linear_residual_triton(x, w, b, res, config={**TILE, "tma": True})
    assert bool(launched) == uses_tma
    if uses_tma:
        assert [TILE["BLOCK_M"], TILE["BLOCK_N"] // 2] in launched, f"res/out not described by halves: {launched}"
    plain = triton_kernels.linear_residual_triton(x, w, b, res, config=TILE)
    if device.type == "cuda":
        torch.testing.assert_close(with_tma, plain, atol=0, rtol=0, msg=lambda m: f"TMA vs pointer kernel: {m}")
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_REL
    check_close(with_tma, oracle.linear_residual(x, w, b, res), 1e-5, rtol, "TMA variant vs oracle")


def test_launcher_refuses_bad_inputs():
    triton_kernels, device = triton_or_skip()
    x, w, b, res = make_inputs(4, 40, 24, torch.float32, device)
    with pytest.raises(AssertionError, match="Incompatible dimensions"):
        triton_kernels.linear_residual_triton(x, w[:, :39], b, res)
    with pytest.raises(AssertionError, match="bad res"):
        triton_kernels.linear_residual_triton(x, w, b, res[:, :23])
    with pytest.raises(AssertionError, match="bad bias"):
        triton_kernels.linear_residual_triton(x, w, b[:23], res)
    with pytest.raises(AssertionError, match="bad out"):
        triton_kernels.linear_residual_triton(x, w, b, res, out=torch.empty(4, 24, device=device, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# The public op: every backend against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", FP32_BF16)
@pytest.mark.parametrize("lead, K, N", [((2, 65), 72, 100), ((1, 1), 33, 17), (130, 64, 40)], ids=str)
def test_public_op_matches_oracle(backend, device, lead, K, N, dtype, atol, rtol, check_close):
    x, w, b, res = make_inputs(lead, K, N, dtype, device)
    with mk.ops.record_dispatch() as calls:
        out = mk.linear_residual(x, w, b, res)
    assert out.dtype == dtype and out.shape == res.shape
    assert calls[(OP, backend)] == 1, dict(calls)
    check_close(out, oracle.linear_residual(x, w, b, res), atol, rtol, f"{OP}[{backend}] {lead, K, N} {dtype}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_vendor_path(device, bias, check_close):
    """The vendor path (addmm with the bias, then the residual in place; what CUDA runs by default),
    forced here on any device, against the oracle; it leaves ``res`` unchanged."""
    x, w, b, res = make_inputs((2, 33), 48, 40, torch.float32, device, bias=bias)
    before = res.clone()
    with _dispatch.force_gemm_path("vendor"), mk.ops.record_dispatch() as calls:
        out = mk.linear_residual(x, w, b, res)
    assert calls[(OP, "vendor")] == 1
    check_close(out, oracle.linear_residual(x, w, b, res), 1e-5, 1e-5, f"{OP} vendor")
    assert torch.equal(res, before), "the vendor path must not write into res"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_k0_is_res_plus_bias(backend, device, bias):
    x, w, b, res = make_inputs((2, 3), 0, 8, torch.float32, device, bias=bias)
    out = mk.linear_residual(x, w, b, res)
    torch.testing.assert_close(out, res + (b if bias else 0), atol=0, rtol=0)


def test_opcheck(device):
    inputs = make_inputs((2, 3), 16, 24, torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.linear_residual.default, inputs)
    x, w, _, res = inputs
    torch.library.opcheck(torch.ops.mosaic.linear_residual.default, (x, w, None, res))


@pytest.mark.parametrize(
    "which, bad, error, match",
    [
        ("x", torch.zeros(()), ValueError, r"x must have at least 1 dim"),
        ("weight", torch.zeros(24, 39), ValueError, r"x's last dim must equal weight.shape\[1\]=39"),
        ("bias", torch.zeros(23), ValueError, r"bias must be \(N,\)=\(24,\)"),
        ("res", torch.zeros(2, 4, 25), ValueError, r"res must be \(\.\.\., N\)=\(2, 4, 24\), got \(2, 4, 25\)"),
        ("res", torch.zeros(8, 24), ValueError, r"res must be 3-D"),
        ("res", torch.zeros(2, 4, 24, dtype=torch.bfloat16), TypeError, "res must have the dtype of x"),
        ("res", torch.zeros(2, 4, 24, dtype=torch.float64), TypeError, "res must be float32, float16 or bfloat16"),
        ("res", torch.zeros(2, 24, 4).transpose(1, 2), ValueError, "res must be contiguous"),
        ("x", torch.zeros(2, 40, 4).transpose(1, 2), ValueError, "x must be contiguous"),
        ("res", [[0.0]], TypeError, "res must be a torch.Tensor"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_inputs_raise(which, bad, error, match):
    args = dict(zip(("x", "weight", "bias", "res"), make_inputs((2, 4), 40, 24, torch.float32, "cpu")))
    args[which] = bad
    with pytest.raises(error, match=f"^{OP}: .*{match}"):
        mk.linear_residual(**args)

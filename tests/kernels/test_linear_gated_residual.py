"""linear_gated_residual: res + gate[:, None, :] * (x @ W.T + b), every backend against the float64 oracle.

Backend tests compare with ``oracle.linear_gated_residual`` (the torch backend *is* the
reference); Triton-only tests use the reference, checked in test_reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import linear_gated_residual_ref

OP = "linear_gated_residual"
HAS_CUDA = torch.cuda.is_available()

# (B, L, K, N): interpreter-sized with tails in every dim; L = 1; B = 3.
SHAPES = [
    (2, 65, 72, 130),
    (3, 7, 200, 96),
    (1, 1, 33, 17),
    (3, 1, 64, 200),
    (2, 16, 128, 72),
]

# fp32: K-term dot in another order plus one FMA in the epilogue, ~1e-6 for O(1) values -> 1e-5.
# bf16/fp16 (Triton GEMM: exact operands, fp32 accumulation and epilogue, one rounding of the
# output, truncated in the interpreter): <= 1 ulp <= 2**-7 |v| (bf16), 2**-10 |v| (fp16);
# rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL, assert_within_gemm_bound, fp32_gemm_bound  # noqa: E402,F401


def make_inputs(B, L, K, N, dtype, device, bias=True):
    x = torch.randn(B, L, K).to(device, dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(N).to(device, dtype) if bias else None
    gate = torch.randn(B, N).to(device, dtype)
    res = torch.randn(B, L, N).to(device, dtype)
    return x, w, b, gate, res


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("B, L, K, N", SHAPES, ids=str)
def test_matches_reference(backend, device, B, L, K, N, dtype, atol, rtol, check_close):
    inputs = make_inputs(B, L, K, N, dtype, device)
    out = mk.linear_gated_residual(*inputs)
    assert out.dtype == dtype and out.shape == (B, L, N)
    expected = oracle.linear_gated_residual(*inputs)
    check_close(out, expected, atol, rtol, f"{OP}[{backend}] {(B, L, K, N)} {dtype}")


def test_no_bias_and_strided_gate(backend, device, check_close):
    x, w, _, _, res = make_inputs(3, 5, 40, 24, torch.float32, device, bias=False)
    gate = torch.randn(3, 6 * 24, device=device).chunk(6, dim=1)[5]
    out = mk.linear_gated_residual(x, w, None, gate, res)
    check_close(out, oracle.linear_gated_residual(x, w, None, gate, res), 1e-5, 1e-5, f"{OP} no bias")


def test_tolerance_rejects_gate_on_residual(device, check_close):
    """Negative control: gating the residual instead of the branch is caught."""
    x, w, b, gate, res = make_inputs(2, 4, 40, 24, torch.float32, device)
    wrong = gate[:, None, :] * res + torch.nn.functional.linear(x, w, b)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(wrong, linear_gated_residual_ref(x, w, b, gate, res), 1e-5, 1e-5, "negative control")


@pytest.mark.parametrize(
    "which, bad, error, match",
    [
        ("x", torch.zeros(10, 40), ValueError, "x must be 3-D"),
        ("res", torch.zeros(2, 4, 25), ValueError, r"res must be \(B, L, N\)=\(2, 4, 24\)"),
        ("gate", torch.zeros(3, 24), ValueError, r"gate must be \(B, N\)=\(2, 24\), got \(3, 24\)"),
        ("res", torch.zeros(2, 4, 24, dtype=torch.bfloat16), TypeError, "res must have the dtype of x"),
        ("res", torch.zeros(2, 24, 4).transpose(1, 2), ValueError, "res must be contiguous"),
        ("x", torch.zeros(2, 40, 4).transpose(1, 2), ValueError, "x must be contiguous"),
    ],
)
def test_bad_inputs_raise(which, bad, error, match):
    args = dict(zip(("x", "weight", "bias", "gate", "res"), make_inputs(2, 4, 40, 24, torch.float32, "cpu")))
    args[which] = bad
    with pytest.raises(error, match=match):
        mk.linear_gated_residual(**args)


def gemm_residual_bound(x, w, b, gate, res):
    """fp32 order bound of ``x @ w.T`` scaled by ``|gate|`` (the only amplification after the dot)."""
    return gate.double().abs()[:, None, :] * fp32_gemm_bound(x.float(), w.float())


def test_two_configs_match_exactly():
    """Different M/N tiling and group order with the same BLOCK_K agree: bitwise on a GPU, within
    the fp32 summation-order bound on the CPU interpreter."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    inputs = make_inputs(2, 65, 96, 100, torch.float32, device)
    base = {"BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    a = triton_kernels.linear_gated_residual_triton(*inputs, config={**base, "BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 1})
    c = triton_kernels.linear_gated_residual_triton(*inputs, config={**base, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})
    if device.type == "cuda":  # same BLOCK_K, same per-tile k-loop: the GPU sums in the same order
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=lambda m: f"tile configs differ: {m}")
    else:  # the interpreter's numpy dot may sum per tile shape differently: bound derived from K
        assert_within_gemm_bound(a, c, gemm_residual_bound(*inputs), "tile configs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, L, K, N, uses_tma", [(2, 65, 64, 72, True), (3, 7, 40, 17, False)], ids=str)
def test_tensor_descriptor_variant(B, L, K, N, uses_tma, dtype, monkeypatch, check_close):
    """The TMA-descriptor kernel equals the pointer kernel (bitwise on a GPU); unaligned N falls back."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    from mosaic_kernels.triton import _matmul

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper (sm_90+)")
    inputs = make_inputs(B, L, K, N, dtype, device)
    launched = []
    make_descriptor = _matmul.make_descriptor
    monkeypatch.setattr(_matmul, "make_descriptor", lambda t, block: launched.append(block) or make_descriptor(t, block))
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3}
    with_tma = triton_kernels.linear_gated_residual_triton(*inputs, config={**cfg, "tma": True})
    assert bool(launched) == uses_tma
    plain = triton_kernels.linear_gated_residual_triton(*inputs, config=cfg)
    if device.type == "cuda":
        torch.testing.assert_close(with_tma, plain, atol=0, rtol=0, msg=lambda m: f"TMA vs pointer kernel: {m}")
    else:
        assert_within_gemm_bound(with_tma.float(), plain.float(), gemm_residual_bound(*inputs)
                                 + 2 * BF16_REL * plain.double().abs() * (dtype != torch.float32), "TMA vs pointer")
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_REL
    check_close(with_tma, linear_gated_residual_ref(*(t.float() for t in inputs)), 1e-5, rtol, "TMA variant")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (vendor addmm + Triton gated_residual)")
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_vendor_path_cuda(dtype, atol, rtol, check_close):
    """Auto on CUDA: cuBLAS addmm rounds y to dtype before the gate, so allow 1 ulp of |gate*y|."""
    x, w, b, gate, res = make_inputs(4, 64, 256, 384, dtype, "cuda")
    with mk.use_backend("auto"):
        out = mk.linear_gated_residual(x, w, b, gate, res)
    expected = linear_gated_residual_ref(x.float(), w.float(), b.float(), gate.float(), res.float())
    y = torch.nn.functional.linear(x.float(), w.float(), b.float())
    ulp = {torch.float32: 2.0**-20, torch.bfloat16: BF16_REL, torch.float16: FP16_REL}[dtype]
    check_close(out, expected, atol + 2 * ulp * (gate.float()[:, None, :] * y).abs().max().item(), rtol, "vendor")


def test_opcheck(device):
    inputs = make_inputs(2, 3, 16, 24, torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.linear_gated_residual.default, inputs)
    x, w, _, gate, res = inputs
    torch.library.opcheck(torch.ops.mosaic.linear_gated_residual.default, (x, w, None, gate, res))

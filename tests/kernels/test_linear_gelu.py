"""linear_gelu: gelu_tanh(x @ W.T + b), every backend (Triton GEMM pinned) against the float64 oracle.

Backend tests compare with ``oracle.linear_gelu`` (F.linear + torch's tanh GELU in float64): the
torch backend *is* the reference. Triton-only tests use the reference, checked in test_reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import gelu_tanh_ref, linear_gelu_ref

OP = "linear_gelu"
HAS_CUDA = torch.cuda.is_available()

# (x shape, N). Interpreter-sized: M <= 130, K <= 200, N <= 200; odd/prime sizes cover the
# masked M, N and K tails of 64-wide tiles; 2-D and 4-D x check the (..., K) flattening.
SHAPES = [
    ((2, 65, 72), 130),
    ((3, 7, 200), 96),
    ((1, 1, 33), 17),
    ((130, 64), 200),
    ((2, 2, 3, 16), 8),
]

# Weights are scaled by 1/sqrt(K) so pre-activations are O(1). fp32: the K-term dot differs from
# torch only in summation order, ~K * 2**-24 * sum|x*w| ~ 1e-6 -> 1e-5. bf16/fp16: operands are
# exact, accumulation is fp32, and the output is rounded once (truncated in the interpreter):
# <= 1 ulp <= 2**-7 |v| (bf16), 2**-10 |v| (fp16); rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL, assert_within_gemm_bound, fp32_gemm_bound  # noqa: E402,F401


def make_inputs(x_shape, N, dtype, device, bias=True):
    K = x_shape[-1]
    x = torch.randn(x_shape).to(device, dtype)
    w = (torch.randn(N, K) / math.sqrt(K)).to(device, dtype)
    b = torch.randn(N).to(device, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("x_shape, N", SHAPES, ids=str)
def test_matches_reference(backend, device, x_shape, N, dtype, atol, rtol, check_close):
    x, w, b = make_inputs(x_shape, N, dtype, device)
    y = mk.linear_gelu(x, w, b)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], N)
    expected = oracle.linear_gelu(x, w, b)
    check_close(y, expected, atol, rtol, f"{OP}[{backend}] {x_shape}->{N} {dtype}")


def test_no_bias(backend, device, check_close):
    x, w, _ = make_inputs((2, 9, 40), 24, torch.float32, device, bias=False)
    check_close(mk.linear_gelu(x, w, None), oracle.linear_gelu(x, w, None), 1e-5, 1e-5, f"{OP} no bias")


def test_transposed_weight_view(backend, device, check_close):
    """A weight that is a transposed view (column-major) is read through its strides."""
    x, w, b = make_inputs((2, 5, 48), 40, torch.float32, device)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    check_close(mk.linear_gelu(x, w_t, b), oracle.linear_gelu(x, w, b), 1e-5, 1e-5, f"{OP} strided weight")


def test_gelu_is_tanh_approximation():
    """The reference GELU is torch's tanh approximation, and differs measurably from erf-GELU."""
    z = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(gelu_tanh_ref(z), F.gelu(z, approximate="tanh"), atol=1e-6, rtol=1e-6)
    assert (gelu_tanh_ref(z) - F.gelu(z)).abs().max() > 1e-4


def test_triton_gelu_extremes(device, check_close):
    """Large |pre-activation| must not produce inf/nan (exp overflow in the epilogue)."""
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    x = torch.tensor([[[-200.0, -30.0, -3.0, 0.0, 3.0, 30.0, 200.0] + [0.0] * 9]], device=device)
    w = torch.eye(16, device=device)
    with mk.use_backend("triton"):
        y = mk.linear_gelu(x, w, None)
    assert torch.isfinite(y).all(), y
    check_close(y, linear_gelu_ref(x, w, None), 1e-5, 1e-5, "gelu extremes")


def test_non_contiguous_x_raises():
    x = torch.randn(2, 40, 5).transpose(1, 2)
    with pytest.raises(ValueError, match="x must be contiguous"):
        mk.linear_gelu(x, torch.randn(8, 40), None)


@pytest.mark.parametrize(
    "x, w, b, error, match",
    [
        (torch.zeros(2, 5, 40), torch.zeros(8, 41), None, ValueError, r"weight.shape\[1\]=41"),
        (torch.zeros(2, 5, 40), torch.zeros(8, 40), torch.zeros(9), ValueError, r"bias must be \(N,\)=\(8,\)"),
        (torch.zeros(2, 5, 40), torch.zeros(8, 40, dtype=torch.bfloat16), None, TypeError, "weight must have the dtype"),
        (torch.zeros(2, 5, 40, dtype=torch.float64), torch.zeros(8, 40, dtype=torch.float64), None, TypeError,
         "float32, float16 or bfloat16"),
        (torch.zeros(2, 5, 40), torch.zeros(8, 40), torch.zeros(8, dtype=torch.float16), TypeError,
         "bias must have the dtype"),
    ],
)
def test_bad_inputs_raise(x, w, b, error, match):
    with pytest.raises(error, match=match):
        mk.linear_gelu(x, w, b)


def test_auto_uses_vendor_path_by_default(monkeypatch):
    """Without a measurement saying otherwise the GEMM runs on the vendor path: under ``auto`` the
    Triton GEMM launcher is not called; pinned ``triton``, it is."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    if not mk.backends("cpu")["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    calls = []
    launcher = triton_kernels.linear_gelu_triton
    monkeypatch.setattr(triton_kernels, "linear_gelu_triton", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    x, w, b = make_inputs((2, 4, 64), 64, torch.float32, "cpu")
    with mk.use_backend("auto"):
        mk.linear_gelu(x, w, b)
    assert not calls, "auto ran the Triton GEMM"
    with mk.use_backend("triton"):
        mk.linear_gelu(x, w, b)
    assert calls, "pinned triton did not run the Triton GEMM"


def test_two_configs_match_exactly():
    """Different M/N tiling and group order with the same BLOCK_K agree: bitwise on a GPU, within
    the fp32 summation-order bound on the CPU interpreter."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    x, w, b = make_inputs((130, 96), 100, torch.float32, device)
    base = {"BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    a = triton_kernels.linear_gelu_triton(x, w, b, config={**base, "BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 1})
    c = triton_kernels.linear_gelu_triton(x, w, b, config={**base, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})
    if device.type == "cuda":  # same BLOCK_K, same per-tile k-loop: the GPU sums in the same order
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=lambda m: f"tile configs differ: {m}")
    else:  # the interpreter's numpy dot may sum per tile shape differently: bound derived from K
        # gelu_tanh is 1.13-Lipschitz: the pre-activation bound grows by at most that factor
        assert_within_gemm_bound(a, c, 1.13 * fp32_gemm_bound(x, w), "tile configs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_shape, N, uses_tma", [((130, 64), 72, True), ((70, 40), 17, False)], ids=str)
def test_tensor_descriptor_variant(x_shape, N, uses_tma, dtype, monkeypatch, check_close):
    """The TMA-descriptor kernel equals the pointer kernel bitwise (same tiles, zero-filled
    tails); shapes whose row strides are not 16-byte aligned (N=17) fall back to the pointer kernel."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    from mosaic_kernels.triton import _matmul

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper (sm_90+)")
    x, w, b = make_inputs(x_shape, N, dtype, device)
    assert _matmul.tma_ok(x, w, torch.empty(x_shape[0], N, dtype=dtype, device=device)) == uses_tma
    launched = []
    make_descriptor = _matmul.make_descriptor
    monkeypatch.setattr(_matmul, "make_descriptor", lambda t, block: launched.append(block) or make_descriptor(t, block))
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 3}
    with_tma = triton_kernels.linear_gelu_triton(x, w, b, config={**cfg, "tma": True})
    assert bool(launched) == uses_tma
    plain = triton_kernels.linear_gelu_triton(x, w, b, config=cfg)
    if device.type == "cuda":
        torch.testing.assert_close(with_tma, plain, atol=0, rtol=0, msg=lambda m: f"TMA vs pointer kernel: {m}")
    else:
        assert_within_gemm_bound(with_tma.float(), plain.float(), 1.13 * fp32_gemm_bound(x.float(), w.float())
                                 + 2 * BF16_REL * plain.double().abs() * (dtype != torch.float32), "TMA vs pointer")
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_REL
    check_close(with_tma, linear_gelu_ref(x.float(), w.float(), b.float()), 1e-5, rtol, "TMA variant")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (vendor cuBLASLt GELU epilogue)")
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_vendor_path_cuda(dtype, atol, rtol, check_close):
    """Auto on CUDA takes _addmm_activation; its GELU must be the tanh approximation."""
    x, w, b = make_inputs((4, 64, 256), 384, dtype, "cuda")
    with mk.use_backend("auto"):
        y = mk.linear_gelu(x, w, b)
    # cuBLAS may round the accumulator differently (split-K): allow 1e-4 absolute in fp32.
    check_close(y, linear_gelu_ref(x.float(), w.float(), b.float()), max(atol, 1e-4), rtol, "vendor")


def test_opcheck(device):
    x, w, b = make_inputs((2, 3, 16), 24, torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.linear_gelu.default, (x, w, b))
    torch.library.opcheck(torch.ops.mosaic.linear_gelu.default, (x, w, None))


def test_gemm_autotune_configs():
    """A short autotune list (one config under the interpreter); fp32 keeps only the configs whose
    operand buffers fit 163 KB; geglu's two accumulators drop the widest tiles; M is bucketed."""
    settings = pytest.importorskip("mosaic_kernels.triton.settings")
    from mosaic_kernels.triton import INTERPRETED

    assert 1 <= len(settings.GEMM_CONFIGS) <= 8
    if INTERPRETED:
        assert len(settings.GEMM_CONFIGS) == 1
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        for epilogue, n_acc in (("gelu_tanh", 1), ("gated_residual", 1), ("geglu", 2)):
            cands = settings.gemm_candidate_configs(dtype, epilogue)
            assert cands
            for c in cands:
                assert c["num_stages"] * (c["BLOCK_M"] + n_acc * c["BLOCK_N"]) * c["BLOCK_K"] * size <= 166912 \
                    or len(cands) == 1
                assert n_acc * c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 32 * c["num_warps"] or len(cands) == 1
    if not INTERPRETED:
        assert len(settings.gemm_candidate_configs(torch.float32)) < len(settings.gemm_candidate_configs(torch.bfloat16))
        assert len(settings.gemm_candidate_configs(torch.bfloat16, "geglu")) < len(settings.GEMM_CONFIGS)
    with pytest.raises(ValueError, match="unknown GEMM epilogue"):
        settings.gemm_candidate_configs(torch.float32, "relu")
    assert [settings.gemm_m_bucket(m) for m in (1, 3, 4096, 4097, 1 << 22)] == [1, 4, 4096, 8192, 1 << 20]

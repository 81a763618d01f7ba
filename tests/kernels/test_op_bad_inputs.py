"""Bad and degenerate inputs to the kernel ops: an exact error, or a defined result on every backend.

Integer arguments take anything integral (``int``, NumPy integers, ``__index__``) but not a bool;
``eps`` takes a finite real number > 0 (Python or NumPy) but not a bool, a string or a tensor.
Empty batches, rows or widths give empty outputs; K = 0 in the GEMM ops gives what
``F.linear`` gives (the bias, or zeros) through the epilogue, on every backend.
"""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk

QKV = torch.randn(2, 3, 3 * 2 * 4)  # H = 2, hd = 4


# ------------------------------------------------------------------------ attention num_heads


@pytest.mark.parametrize(
    "heads, error, match",
    [
        (True, TypeError, r"^attention: num_heads must be an int, not a bool, got True$"),
        (False, TypeError, r"^attention: num_heads must be an int, not a bool, got False$"),
        (np.bool_(True), TypeError, r"^attention: num_heads must be an int, got .*\(bool_?\)$"),
        (2.0, TypeError, r"^attention: num_heads must be an int, got 2\.0 \(float\)$"),
        (np.float64(2.0), TypeError, r"^attention: num_heads must be an int, got .*2\.0.* \(float64\)$"),
        ("2", TypeError, r"^attention: num_heads must be an int, got '2' \(str\)$"),
        (None, TypeError, r"^attention: num_heads must be an int, got None \(NoneType\)$"),
        (torch.tensor(2.0), TypeError, r"^attention: num_heads must be an int, got tensor\(2\.\) \(Tensor\)$"),
        (0, ValueError, r"^attention: num_heads must be a positive int, got 0$"),
        (-2, ValueError, r"^attention: num_heads must be a positive int, got -2$"),
        (np.int64(0), ValueError, r"^attention: num_heads must be a positive int, got 0$"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_attention_num_heads_refused(heads, error, match):
    with pytest.raises(error, match=match):
        mk.attention(QKV, heads)


@pytest.mark.parametrize("heads", [np.int64(2), np.int32(2), np.uint8(2), torch.tensor(2)], ids=repr)
def test_attention_num_heads_integral_accepted(heads):
    """Integral num_heads of any type run the same computation as the int (same kernel, same call)."""
    assert torch.equal(mk.attention(QKV, heads), mk.attention(QKV, 2))


# ------------------------------------------------------------------------------------- eps

_LN_ARGS = (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8))
_GRLN_ARGS = (torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8))
_AFFINE_LN_ARGS = (torch.randn(2, 3, 8), torch.randn(8), torch.randn(8))
_RMS_ROPE_ARGS = (torch.randn(2, 3, 2, 8), torch.randn(8), torch.randn(3, 8), torch.randn(3, 8))
_EPS_OPS = {"ln_modulate": (mk.ln_modulate, _LN_ARGS),
            "gated_residual_ln_modulate": (mk.gated_residual_ln_modulate, _GRLN_ARGS),
            "layer_norm": (mk.layer_norm, _AFFINE_LN_ARGS),
            "rms_norm_rope": (mk.rms_norm_rope, _RMS_ROPE_ARGS)}


@pytest.mark.parametrize("op", list(_EPS_OPS))
@pytest.mark.parametrize(
    "eps, error, match",
    [
        (True, TypeError, r"eps must be a positive finite float, got True \(bool\)$"),
        (math.nan, ValueError, r"eps must be a positive finite float, got nan$"),
        (math.inf, ValueError, r"eps must be a positive finite float, got inf$"),
        (-1e-6, ValueError, r"eps must be a positive finite float, got -1e-06$"),
        (0, ValueError, r"eps must be a positive finite float, got 0$"),
        ("1e-6", TypeError, r"eps must be a positive finite float, got '1e-6' \(str\)$"),
        (torch.tensor(1e-6), TypeError, r"eps must be a positive finite float, got tensor\(1\.0000e-06\) \(Tensor\)$"),
        (None, TypeError, r"eps must be a positive finite float, got None \(NoneType\)$"),
    ],
    ids=["True", "nan", "inf", "negative", "zero", "str", "tensor", "None"],
)
def test_bad_eps_refused(op, eps, error, match):
    fn, args = _EPS_OPS[op]
    with pytest.raises(error, match=f"^{op}: {match}"):
        fn(*args, eps=eps)


@pytest.mark.parametrize("op", list(_EPS_OPS))
@pytest.mark.parametrize("eps", [np.float32(1e-5), np.float64(1e-5), 1], ids=["np.float32", "np.float64", "int"])
def test_numpy_and_int_eps_accepted(op, eps):
    fn, args = _EPS_OPS[op]
    got, want = fn(*args, eps=eps), fn(*args, eps=float(eps))
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        assert torch.equal(g, w)


def test_zero_d_x_refused():
    with pytest.raises(ValueError, match=r"^linear_gelu: x must have at least 1 dim \(\.\.\., K\), got shape \(\)$"):
        mk.linear_gelu(torch.zeros(()), torch.zeros(4, 1), None)


# --------------------------------------------------------------- K = 0 and empty dimensions


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gelu_k0_is_gelu_of_bias(backend, device, bias):
    """K = 0: F.linear gives the bias (or zeros) in every row, then the tanh GELU."""
    b = torch.tensor([1.0, -1.0, 2.0, -3.0, 0.5], device=device) if bias else None
    x, w = torch.zeros(2, 3, 0, device=device), torch.zeros(5, 0, device=device)
    out = mk.linear_gelu(x, w, b)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), oracle.linear_gelu(x, w, b), atol=1e-6, rtol=1e-6)
    if bias:
        assert out[1, 2, 0].item() == pytest.approx(0.8411920, abs=1e-6)  # gelu_tanh(1)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gated_residual_k0(backend, device, bias):
    b = torch.tensor([1.0, -1.0, 2.0, -3.0], device=device) if bias else None
    x, w = torch.zeros(2, 3, 0, device=device), torch.zeros(4, 0, device=device)
    gate, res = torch.randn(2, 4, device=device), torch.randn(2, 3, 4, device=device)
    out = mk.linear_gated_residual(x, w, b, gate, res)
    want = res + gate[:, None, :] * (b if bias else 0.0)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_geglu_k0_is_geglu_of_bias(backend, device, bias):
    """K = 0: F.linear gives the bias (or zeros) in every row, then value * gelu(gate)."""
    b = torch.tensor([1.0, -1.0, 2.0, 3.0, 0.5, -2.0], device=device) if bias else None
    x, w = torch.zeros(2, 3, 0, device=device), torch.zeros(6, 0, device=device)
    out = mk.linear_geglu(x, w, b)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out.double(), oracle.linear_geglu(x, w, b), atol=1e-6, rtol=1e-6)
    if bias:
        assert out[1, 2, 0].item() == pytest.approx(1.0 * 2.9959502, abs=1e-5)  # 1 * gelu(3)


@pytest.mark.op("ln_modulate")  # the cuda case runs the compiled kernels too (gated_residual: auto order)
@pytest.mark.parametrize("shape", [(0, 3, 72), (2, 0, 72), (2, 3, 0)], ids=["B0", "L0", "D0"])
def test_row_ops_empty(backend, device, shape):
    B, L, D = shape
    x, v = torch.randn(B, L, D, device=device), torch.randn(B, D, device=device)
    assert mk.ln_modulate(x, v, v).shape == shape
    assert mk.gated_residual(x, v, x).shape == shape
    h, normed = mk.gated_residual_ln_modulate(x, v, x, v, v)
    assert h.shape == normed.shape == shape
    w = torch.randn(D, device=device)
    assert mk.layer_norm(x, w, w).shape == mk.layer_norm(x, None, None).shape == shape
    cos_sin = torch.randn(L, D, device=device)
    assert mk.rms_norm_rope(x.unsqueeze(2), w, cos_sin, cos_sin).shape == (B, L, 1, D)


@pytest.mark.parametrize("M, N, K", [(0, 5, 8), (4, 0, 8), (0, 0, 0)], ids=["M0", "N0", "all0"])
def test_gemm_ops_empty(backend, device, M, N, K):
    x, w = torch.randn(1, M, K, device=device), torch.randn(N, K, device=device)
    assert mk.linear_gelu(x, w, torch.randn(N, device=device)).shape == (1, M, N)
    out = mk.linear_gated_residual(x, w, None, torch.randn(1, N, device=device), torch.randn(1, M, N, device=device))
    assert out.shape == (1, M, N)
    w2 = torch.randn(2 * N, K, device=device)  # GEGLU: value and gate rows
    assert mk.linear_geglu(x, w2, torch.randn(2 * N, device=device)).shape == (1, M, N)


@pytest.mark.parametrize("B, L", [(0, 3), (2, 0)], ids=["B0", "L0"])
def test_attention_empty(device, B, L):
    assert mk.attention(torch.randn(B, L, 24, device=device), 2).shape == (B, L, 8)

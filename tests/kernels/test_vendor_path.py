"""The vendor (cuBLAS(Lt) through torch) GEMM paths, run on CPU.

``auto`` takes the vendor path only for CUDA tensors, because ``torch._addmm_activation(...,
use_gelu=True)`` is the tanh GELU on CUDA but the erf GELU on CPU. Everything else in that path
is plain torch, so here it runs on CPU with ``torch._addmm_activation`` replaced by a spy that
computes the CUDA semantics (tanh GELU) and records how it was called: a vendor path that drops
the bias, or uses the erf GELU on its no-bias branch, fails here without a GPU.
"""

from __future__ import annotations

import math

import oracle
import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk
from mosaic_kernels import ops
from mosaic_kernels.ops import _dispatch
from mosaic_kernels.ops.linear_gated_residual import _vendor_linear_gated_residual
from mosaic_kernels.ops.linear_gelu import _vendor_linear_gelu


class _AddmmActivationSpy:
    """Stands in for torch._addmm_activation with its CUDA semantics (tanh GELU)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, bias, mat1, mat2, *, beta=1, alpha=1, use_gelu=False):
        self.calls.append((bias, mat1, mat2, use_gelu))
        out = torch.addmm(bias, mat1, mat2, beta=beta, alpha=alpha)
        return F.gelu(out, approximate="tanh") if use_gelu else F.relu(out)


@pytest.fixture
def addmm_spy(monkeypatch) -> _AddmmActivationSpy:
    spy = _AddmmActivationSpy()
    monkeypatch.setattr(torch, "_addmm_activation", spy)
    return spy


def _inputs(M=10, K=48, N=40, bias=True):
    x = torch.randn(M, K)
    w = torch.randn(N, K) / math.sqrt(K)
    return x, w, (torch.randn(N) if bias else None)


def test_bias_branch_is_one_fused_gemm_with_the_bias(addmm_spy, check_close):
    x, w, b = _inputs()
    out = _vendor_linear_gelu(x, w, b)
    assert len(addmm_spy.calls) == 1
    bias, mat1, mat2, use_gelu = addmm_spy.calls[0]
    assert bias is b and mat1 is x and use_gelu is True
    assert torch.equal(mat2, w.t())
    check_close(out, oracle.linear_gelu(x, w, b), 1e-5, 1e-5, "vendor linear_gelu, bias")


def test_no_bias_branch_is_tanh_gelu(addmm_spy, check_close):
    """Without a bias: a plain GEMM and torch's tanh GELU (erf GELU differs by up to ~5e-4)."""
    x, w, _ = _inputs(bias=False)
    out = _vendor_linear_gelu(x, w, None)
    assert not addmm_spy.calls
    check_close(out, oracle.linear_gelu(x, w, None), 1e-5, 1e-5, "vendor linear_gelu, no bias")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_k0_needs_no_gemm(addmm_spy, bias, check_close):
    x, w, b = _inputs(K=0, bias=bias)
    out = _vendor_linear_gelu(x, w, b)
    assert not addmm_spy.calls and out.shape == (10, 40)
    check_close(out, oracle.linear_gelu(x, w, b), 1e-6, 1e-6, "vendor linear_gelu, K = 0")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gelu_op_through_the_vendor_path(monkeypatch, addmm_spy, bias, check_close):
    """The op itself, with the CUDA-only path selection forced: 3-D x flattened and restored."""
    monkeypatch.setattr(_dispatch, "gemm_path", lambda op, x, M, N, K: "vendor")
    x, w, b = _inputs(bias=bias)
    x3 = x.view(2, 5, 48)
    with ops.record_dispatch() as calls:
        out = mk.linear_gelu(x3, w, b)
    assert calls == {("linear_gelu", "vendor"): 1}
    assert out.shape == (2, 5, 40) and len(addmm_spy.calls) == int(bias)
    check_close(out, oracle.linear_gelu(x3, w, b), 1e-5, 1e-5, "linear_gelu op, vendor path")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_vendor_linear_gated_residual(bias, check_close):
    x, w, b = _inputs(bias=bias)
    gate, res = torch.randn(2, 40), torch.randn(2, 5, 40)
    out = _vendor_linear_gated_residual(x, w, b, gate, res)
    check_close(out, oracle.linear_gated_residual(x.view(2, 5, 48), w, b, gate, res), 1e-5, 1e-5,
                "vendor linear_gated_residual")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gated_residual_op_through_the_vendor_path(monkeypatch, bias, check_close):
    monkeypatch.setattr(_dispatch, "gemm_path", lambda op, x, M, N, K: "vendor")
    x, w, b = _inputs(bias=bias)
    x3, gate, res = x.view(2, 5, 48), torch.randn(2, 40), torch.randn(2, 5, 40)
    with ops.record_dispatch() as calls:
        out = mk.linear_gated_residual(x3, w, b, gate, res)
    assert calls[("linear_gated_residual", "vendor")] == 1
    check_close(out, oracle.linear_gated_residual(x3, w, b, gate, res), 1e-5, 1e-5, "op, vendor path")



@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_geglu_op_through_the_vendor_path(monkeypatch, bias, check_close):
    """The GEGLU vendor path (plain torch: the GEMM, then value * erf-GELU(gate)), through the op."""
    monkeypatch.setattr(_dispatch, "gemm_path", lambda op, x, M, N, K: "vendor")
    x, w, b = _inputs(N=40, bias=bias)
    x3 = x.view(2, 5, 48)
    with ops.record_dispatch() as calls:
        out = mk.linear_geglu(x3, w, b)
    assert calls == {("linear_geglu", "vendor"): 1} and out.shape == (2, 5, 20)
    check_close(out, oracle.linear_geglu(x3, w, b), 1e-5, 1e-5, "linear_geglu op, vendor path")
    # the value and gate halves are not interchangeable: the check above would catch a swap
    h, gate = F.linear(x3, w, b).chunk(2, dim=-1)
    assert (gate * F.gelu(h) - out).abs().max() > 1e-2

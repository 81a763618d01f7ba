"""Backend dispatch: pins (env var and use_backend), errors for unavailable pins, backends()."""

from __future__ import annotations

import logging

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels import ops
from mosaic_kernels.ops import _dispatch
from mosaic_kernels.reference import ln_modulate_ref


def _inputs():
    return torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 16)


def test_backends_report():
    info = mk.backends("cpu")
    for name in ("cuda", "triton", "torch"):
        assert set(info[name]) == {"available", "reason"}
        assert isinstance(info[name]["available"], bool)
        assert info[name]["available"] or info[name]["reason"], f"{name} unavailable without a reason"
    assert info["torch"]["available"]
    assert not info["cuda"]["available"], "compiled kernels cannot run CPU tensors"


def test_env_pin(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    assert mk.current_backend() == "torch"
    assert mk.select_backend("ln_modulate", "cpu") == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="MOSAIC_KERNELS_BACKEND: expected one of .* got 'bogus'"):
        mk.ln_modulate(*_inputs())


def test_use_backend_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    with mk.use_backend("auto"):
        assert mk.current_backend() == "auto"
        with mk.use_backend("torch"):
            assert mk.current_backend() == "torch"
        assert mk.current_backend() == "auto"
    assert mk.current_backend() == "torch"
    with pytest.raises(ValueError, match="use_backend: expected one of"):
        with mk.use_backend("cudnn"):
            pass


def test_pinned_cuda_on_cpu_raises():
    with mk.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' is pinned but unavailable"):
        mk.ln_modulate(*_inputs())


def test_pinned_cuda_without_compiled_kernel_follows_auto():
    """gated_residual has no compiled kernel: a cuda pin runs the auto order instead of failing."""
    res, gate, y = torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 3, 16)
    with mk.use_backend("cuda"), ops.record_dispatch() as calls:
        out = mk.gated_residual(res, gate, y)
    auto = "triton" if mk.backends("cpu")["triton"]["available"] else "torch"
    assert calls == {("gated_residual", auto): 1}
    torch.testing.assert_close(out, res + gate[:, None, :] * y, atol=1e-6, rtol=1e-6)
    assert (out - res).abs().max() > 0.1  # the gated branch is really there


def test_pinned_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "_triton_status", lambda device: (False, "no triton here (test)"))
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' is pinned but unavailable: no triton"):
        mk.ln_modulate(*_inputs())


def test_auto_falls_back_to_torch_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_triton_status", lambda device: (False, "unit-test reason"))
    monkeypatch.setattr(_dispatch, "_logged", set())
    x, shift, scale = _inputs()
    with mk.use_backend("auto"), caplog.at_level(logging.INFO, logger="mosaic_kernels.ops"):
        y1 = mk.ln_modulate(x, shift, scale)
        mk.ln_modulate(x, shift, scale)
    torch.testing.assert_close(y1, ln_modulate_ref(x, shift, scale), atol=0, rtol=0)
    msgs = [r.getMessage() for r in caplog.records if "unit-test reason" in r.getMessage()]
    assert len(msgs) == 1, msgs


def test_auto_on_cpu_uses_triton_under_interpreter():
    expected = "triton" if mk.backends("cpu")["triton"]["available"] else "torch"
    with mk.use_backend("auto"):
        assert mk.select_backend("ln_modulate", "cpu") == expected


def test_backward_runs_on_every_backend():
    """The ops are differentiable whichever backend ran the forward (tests/kernels/test_backward.py
    checks the gradients)."""
    x, shift, scale = _inputs()
    upstream = torch.randn_like(x)
    grads = []
    for backend in ("torch", "auto"):
        leaf = x.clone().requires_grad_(True)
        with mk.use_backend(backend):
            mk.ln_modulate(leaf, shift, scale).backward(upstream)
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all()
    # the backward recomputes the reference on the saved inputs: the same values after any forward
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-6)


def test_empty_batch():
    x = torch.randn(0, 3, 16)
    with mk.use_backend("auto"):
        assert mk.ln_modulate(x, torch.randn(0, 16), torch.randn(0, 16)).shape == (0, 3, 16)


def test_mixed_dtypes_skip_compiled_kernel(monkeypatch):
    """The compiled kernels take one dtype: auto skips them for mixed inputs, a cuda pin raises."""
    monkeypatch.setattr(_dispatch, "_cuda_status", lambda device: (True, ""))
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    mixed = _dispatch.cuda_inputs_status("ln_modulate", x, torch.randn(2, 16), torch.randn(2, 16))
    assert not mixed[0] and "one dtype" in mixed[1]
    with mk.use_backend("auto"):
        assert mk.select_backend("ln_modulate", "cpu", mixed) in ("triton", "torch")
        assert mk.select_backend("ln_modulate", "cpu") == "cuda"
    with mk.use_backend("cuda"), pytest.raises(RuntimeError, match="one dtype"):
        mk.select_backend("ln_modulate", "cpu", mixed)


def test_compiled_block_all_ops_two_batch_sizes():
    """A block-shaped function over every custom op traces into one graph (fullgraph) and stays
    correct for a second batch size (aot_eager on CPU: inductor codegen is too slow here)."""
    from mosaic_kernels import reference as ref

    torch._dynamo.reset()
    D, F, H = 32, 48, 2

    def block(x, mod, w_qkv, w_proj, w1, w2):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        h = mk.ln_modulate(x, shift1, scale1)
        a = mk.attention(torch.nn.functional.linear(h, w_qkv), H)
        x = mk.linear_gated_residual(a, w_proj, None, gate1, x)
        h = mk.ln_modulate(x, shift2, scale2)
        return mk.linear_gated_residual(mk.linear_gelu(h, w1, None), w2, None, gate2, x)

    def block_ref(x, mod, w_qkv, w_proj, w1, w2):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        a = ref.attention_ref(torch.nn.functional.linear(ref.ln_modulate_ref(x, shift1, scale1), w_qkv), H)
        x = ref.linear_gated_residual_ref(a, w_proj, None, gate1, x)
        h = ref.ln_modulate_ref(x, shift2, scale2)
        return ref.linear_gated_residual_ref(ref.linear_gelu_ref(h, w1, None), w2, None, gate2, x)

    weights = [torch.randn(3 * D, D) / D**0.5, torch.randn(D, D) / D**0.5,
               torch.randn(F, D) / D**0.5, torch.randn(D, F) / F**0.5]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for B in (2, 3):
        x, mod = torch.randn(B, 5, D), torch.randn(B, 6 * D)
        torch.testing.assert_close(compiled(x, mod, *weights), block_ref(x, mod, *weights), atol=1e-4, rtol=1e-4,
                                   msg=lambda m, B=B: f"compiled block, B={B}: {m}")


def test_forced_gemm_path_overrides_pin_and_choice():
    """The benchmark providers force a GEMM path: it runs whatever the pin or the per-shape choice
    says; an unknown path or an unavailable Triton GEMM is refused."""
    x, w = torch.randn(2, 3, 16), torch.randn(8, 16)
    with mk.use_backend("torch"), _dispatch.force_gemm_path("vendor"), ops.record_dispatch() as calls:
        mk.linear_gelu(x, w, None)
    assert calls == {("linear_gelu", "vendor"): 1}
    with pytest.raises(ValueError, match="force_gemm_path: expected one of"):
        with _dispatch.force_gemm_path("cublas"):
            pass


def test_forced_triton_gemm_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "_triton_status", lambda device: (False, "no triton here (test)"))
    with _dispatch.force_gemm_path("triton"), pytest.raises(RuntimeError, match="forced but unavailable: no triton"):
        mk.linear_geglu(torch.randn(2, 3, 16), torch.randn(8, 16), None)


def test_compiled_kernels_are_declared_by_their_ops():
    assert _dispatch.CUDA_OPS == {"ln_modulate", "gated_residual_ln_modulate"}

"""``fp8_gemm`` (float8 weights, per-output-channel scales) against a float64 oracle of the dequantized math.

The oracle dequantizes the float8 weight (``q.double() * scale``) and, in ``"per_token"`` mode,
the activations quantized by this file's own per-row quantizer (written with ``torch.aminmax``
and float64 scales, not the library's code), then runs the float64 formulas of ``oracle.py``.
Both backends are checked: the Triton kernel (the interpreter on CPU; float8 ``tl.dot`` runs
there as is) and the torch reference. Shapes are awkward on purpose (odd K and N, single rows,
partial tiles). Tolerances: the output dtype's rounding (2 ulps) plus the fp32 GEMM bound of the
dequantized operands (``tolerances.fp32_gemm_bound``), which covers the kernel applying the
scales to the fp32 accumulator after the sum instead of to each term.
"""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels import reference as ref
from mosaic_kernels.ops import fp8 as fp8_ops

import oracle
from tolerances import BF16_REL, fp32_gemm_bound

OP = "fp8_gemm"
E4M3_MAX = 448.0

# (B, L, K, N): partial tiles, odd widths, a single token, K not a multiple of 16.
SHAPES = [(2, 37, 72, 50), (1, 1, 130, 33), (3, 5, 17, 129)]
DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 2 * BF16_REL, id="bf16")]
EPILOGUES = fp8_ops.FP8_EPILOGUES
BACKENDS = [pytest.param("triton", id="triton", marks=pytest.mark.skipif(
    not mk.backends("cpu")["triton"]["available"], reason="Triton interpreter unavailable")),
    pytest.param("torch", id="torch")]


def quantize_rows64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent per-row quantizer: float64 maxima, the fp32 scale, torch's RNE float8 cast."""
    lo, hi = torch.aminmax(x.double(), dim=1)
    amax = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-12)
    scale = (amax / E4M3_MAX).float()
    q = torch.clamp(x.float() / scale[:, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequant64(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double()[:, None]


def _case(B, L, K, N, dtype, epilogue, gen):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rnd(B, L, K)
    rows = 2 * N if epilogue == "geglu" else N
    w, w_scale = quantize_rows64(torch.randn(rows, K, generator=gen) * K**-0.5)
    w_scale = w_scale * torch.linspace(0.5, 2.0, rows)  # channel scales of different sizes
    kw = {}
    if epilogue == "gated_residual":
        kw = {"gate": rnd(B, N, scale=0.5), "res": rnd(B, L, N)}
    elif epilogue == "residual":
        kw = {"res": rnd(B, L, N)}
    return x, w, w_scale.contiguous(), rnd(rows, scale=0.1), kw


def _oracle(x, w, w_scale, bias, epilogue, mode, kw):
    x64 = x.double()
    if mode == "per_token":
        x64 = dequant64(*quantize_rows64(x.reshape(-1, x.shape[-1]))).view(x.shape)
    w64 = dequant64(w, w_scale)
    if epilogue == "none":
        return oracle.linear(x64, w64, bias)
    if epilogue == "gelu_tanh":
        return oracle.linear_gelu(x64, w64, bias)
    if epilogue == "gated_residual":
        return oracle.linear_gated_residual(x64, w64, bias, kw["gate"], kw["res"])
    if epilogue == "residual":
        return oracle.linear_residual(x64, w64, bias, kw["res"])
    return oracle.linear_geglu(x64, w64, bias)


def _bound(x, w, w_scale, epilogue, mode):
    """The fp32 GEMM bound of the dequantized operands, per output column (geglu: both halves)."""
    x32 = x.float() if mode == "weight_only" else dequant64(*quantize_rows64(x.reshape(-1, x.shape[-1]))).float()
    b = fp32_gemm_bound(x32.reshape(-1, x.shape[-1]), dequant64(w, w_scale).float())
    if epilogue == "geglu":  # |d(v * gelu(g))| <= |dv| |gelu(g)| + |v| |gelu'(g)| |dg|, |gelu'| < 1.13
        v, g = b.chunk(2, dim=-1)
        return (v + g) * 4.0  # generous: |v|, |g| are O(1) here
    if epilogue == "gated_residual":
        return b * 2.0  # |gate| < 2 with overwhelming probability (0.5 * randn)
    return b * 1.2  # gelu's slope stays below 1.13


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", fp8_ops.FP8_ACT_MODES)
@pytest.mark.parametrize("dtype, rtol", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_fp8_gemm_matches_float64_oracle(backend, mode, dtype, rtol, epilogue):
    gen = torch.Generator().manual_seed(hash((mode, str(dtype), epilogue)) % 2**31)
    for B, L, K, N in SHAPES:
        x, w, w_scale, bias, kw = _case(B, L, K, N, dtype, epilogue, gen)
        with mk.use_backend(backend), mk.record_dispatch() as calls:
            got = mk.fp8_gemm(x, w, w_scale, bias, epilogue=epilogue, mode=mode, **kw)
        assert calls[(OP, backend)] == 1, dict(calls)
        want = _oracle(x, w, w_scale, bias, epilogue, mode, kw)
        out_dtype = kw["res"].dtype if "res" in kw else dtype
        assert got.dtype == out_dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        bound = _bound(x, w, w_scale, epilogue, mode).view(want.shape)
        err = (got.double() - want).abs()
        limit = 1e-6 + rtol * want.abs() + bound
        worst = int((err - limit).argmax())
        assert bool((err <= limit).all()), (
            f"{backend} {mode} {dtype} {epilogue} {(B, L, K, N)}: |diff| {err.flatten()[worst]:.3e} > "
            f"{limit.flatten()[worst]:.3e} at {worst} (got {got.flatten()[worst].item()}, "
            f"want {want.flatten()[worst].item()})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_with_a_separate_gate_weight(backend):
    """geglu's gate rows as their own float8 weight and scale equal the stacked (2N, K) weight."""
    gen = torch.Generator().manual_seed(3)
    x, w, w_scale, bias, _ = _case(2, 9, 40, 24, torch.float32, "geglu", gen)
    with mk.use_backend(backend):
        stacked = mk.fp8_gemm(x, w, w_scale, bias, epilogue="geglu")
        split = mk.fp8_gemm(x, w[:24], w_scale[:24], bias[:24], epilogue="geglu", gate_weight=w[24:],
                            gate_weight_scale=w_scale[24:], gate_bias=bias[24:])
    torch.testing.assert_close(split, stacked, atol=1e-6, rtol=1e-6)


def test_the_scale_is_applied_per_output_channel():
    """A mutant that used one scale for every channel (or none) fails: doubling one channel's
    scale doubles exactly that output column."""
    gen = torch.Generator().manual_seed(5)
    x, w, w_scale, _, _ = _case(1, 6, 32, 8, torch.float32, "none", gen)
    s2 = w_scale.clone()
    s2[3] *= 2
    with mk.use_backend("triton" if mk.backends("cpu")["triton"]["available"] else "torch"):
        a, b = mk.fp8_gemm(x, w, w_scale), mk.fp8_gemm(x, w, s2)
    torch.testing.assert_close(b[..., 3], 2 * a[..., 3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b[..., :3], a[..., :3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_quantization(backend):
    """Per-row scales (max / 448), saturation at 448, round to nearest even, zero rows stay 0.

    Values near powers of two are included: the interpreter's own float8 cast loses the carry
    there (124.2 -> 64), which the kernel's fp32 rounding must avoid.
    """
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(70, 300, generator=gen) * torch.logspace(-3, 3, 70)[:, None]
    x[5] = 0.0
    x[6, :4] = torch.tensor([124.18, -31.0383, 447.0, 1e-9])
    x[6, 4] = 448.0  # the row maximum: q = 448 exactly
    with mk.use_backend(backend):
        q, scale = mk.quantize_rows_fp8(x)
    q_want, scale_want = quantize_rows64(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_want, atol=0, rtol=1e-6)
    torch.testing.assert_close(q.float(), q_want.float(), atol=1e-6, rtol=1e-6)
    assert float(q[6, 4].float()) == pytest.approx(E4M3_MAX)
    assert not q[5].float().any() and float(scale[5]) > 0


def test_weight_quantization_error_is_half_an_e4m3_step():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]
    q, scale = mk.quantize_fp8_weight(w.bfloat16())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,) and scale.dtype == torch.float32
    err = (dequant64(q, scale) - w.bfloat16().double()).abs()
    # 3 mantissa bits: half a step is 2**-4 relative; below e4m3's normals (2**-6) the step is 2**-9.
    assert bool((err <= 2.0**-4 * w.bfloat16().double().abs() + 2.0**-10 * scale.double()[:, None] + 1e-12).all())
    assert float((q.float().abs().amax(dim=1) - E4M3_MAX).abs().max()) < 1e-6  # every row uses the full range


def test_compiles_without_a_graph_break_and_passes_opcheck():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    x, w, w_scale, bias, kw = _case(2, 8, 32, 16, torch.float32, "gated_residual", gen)

    def fn(x, w, s, b, gate, res):
        return mk.fp8_gemm(x, w, s, b, epilogue="gated_residual", gate=gate, res=res)

    want = fn(x, w, w_scale, bias, kw["gate"], kw["res"])
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, w_scale, bias, kw["gate"], kw["res"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.library.opcheck(torch.ops.mosaic.fp8_gemm.default,
                          (x, w, w_scale, bias, "gated_residual", "per_token", kw["gate"], kw["res"], None, None, None),
                          test_utils="test_faketensor")  # test_schema multiplies float8 tensors: not implemented on CPU


def test_reference_is_dequantize_then_the_bf16_reference():
    gen = torch.Generator().manual_seed(13)
    x, w, w_scale, bias, _ = _case(1, 4, 24, 12, torch.float32, "gelu_tanh", gen)
    want = ref.linear_gelu_ref(x, ref.dequantize_fp8_ref(w, w_scale), bias)
    torch.testing.assert_close(ref.fp8_gemm_ref("gelu_tanh", x, w, w_scale, bias), want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs and unsupported devices
# ---------------------------------------------------------------------------------------------


def _good():
    w, s = mk.quantize_fp8_weight(torch.randn(8, 16))
    return torch.randn(2, 3, 16), w, s


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: {**a, "weight": a["weight"].float()}, TypeError, "weight must be float8_e4m3fn"),
    (lambda a: {**a, "weight_scale": a["weight_scale"][:4]}, ValueError, r"weight_scale must be contiguous \(8,\)"),
    (lambda a: {**a, "weight_scale": a["weight_scale"][:, None]}, ValueError, "weight_scale must be contiguous"),
    (lambda a: {**a, "weight_scale": a["weight_scale"].bfloat16()}, TypeError, "weight_scale must be a float32"),
    (lambda a: {**a, "weight_scale": 1.0}, TypeError, "weight_scale must be a float32 tensor, got float"),
    (lambda a: {**a, "epilogue": "relu"}, ValueError, "epilogue must be one of"),
    (lambda a: {**a, "mode": "int8"}, ValueError, "mode must be one of"),
    (lambda a: {**a, "x": torch.randn(2, 3, 15)}, ValueError, "x's last dim must equal"),
    (lambda a: {**a, "bias": torch.randn(8).bfloat16()}, TypeError, "bias must have the dtype of x"),
    (lambda a: {**a, "epilogue": "residual"}, TypeError, "res must be a torch.Tensor"),
    (lambda a: {**a, "gate": torch.randn(2, 8)}, ValueError, "gate belongs to the gated_residual epilogue"),
    (lambda a: {**a, "epilogue": "geglu", "weight": a["weight"][:7], "weight_scale": a["weight_scale"][:7]},
     ValueError, "2 \\* inner rows"),
])
def test_bad_inputs_raise_one_clear_line(mutate, error, match):
    x, w, s = _good()
    args = mutate({"x": x, "weight": w, "weight_scale": s, "bias": None, "epilogue": "none", "mode": "weight_only"})
    with pytest.raises(error, match=match) as info:
        mk.fp8_gemm(args.pop("x"), args.pop("weight"), args.pop("weight_scale"), args.pop("bias"), **args)
    assert "\n" not in str(info.value)


def test_quantize_fp8_weight_rejects_bad_weights():
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16"):
        mk.quantize_fp8_weight(_good()[1])
    with pytest.raises(ValueError, match="must be 2-D"):
        mk.quantize_fp8_weight(torch.randn(4))


@pytest.mark.parametrize("arch, refused", [(80, True), (86, True), (89, False), (90, False)])
def test_targets_without_fp8_tensor_cores_are_refused(arch, refused):
    from triton.backends.compiler import GPUTarget

    from mosaic_kernels.triton.fp8_gemm import fp8_refusal

    msg = fp8_refusal(GPUTarget("cuda", arch, 32))
    assert (msg is not None) == refused
    if refused:
        assert "compute capability >= 8.9" in msg and f"({arch // 10}, {arch % 10})" in msg and "\n" not in msg

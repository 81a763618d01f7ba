"""rms_norm_rope: per-head RMSNorm, then RoPE, every backend against the float64 oracle and diffusers.

The reference is checked against diffusers' own modules (SD3.5's ``Attention(qk_norm="rms_norm")
.norm_q``, a diffusers ``RMSNorm``; Flux's ``FluxAttention.norm_q``, a ``torch.nn.RMSNorm``, then
``apply_rotary_emb``); the backends against the independent float64 ``oracle.rms_norm_rope``.

Tolerances (derived as in ``tolerances.py``: one rounding is <= 1 ulp, 2**-7 |v| in bf16, the
interpreter truncating): the op rounds like the diffusers modules, i.e. besides the final
rounding of the output it rounds the normalized row k times before RoPE (k = 2 for a half weight
without RoPE, 1 with RoPE or without a weight, 0 in fp32). An error e |y| in ``y`` reaches the
output through the rotation as ``e (|y[j] cos[j]| + |y[j^1] sin[j]|)``: so output ``j`` is
within ``u |out[j]| + k u (|y[j] cos[j]| + |y[j^1] sin[j]|)`` of the oracle, u the dtype's ulp
(fp32: u = 1e-5 covers the fp32 sums), plus 1e-6. Elementwise rtol alone would not do: a
rotated output can cancel to ~0 while its pair is O(1).
"""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.ops.rms_norm_rope import rms_norm_rope_eager, rope_tables
from mosaic_kernels.reference import rms_norm_rope_ref
from tolerances import BF16_REL, FP16_REL
from triton_backend import triton_or_skip

OP = "rms_norm_rope"
EPS = 1e-6

# (B, S, H, D): every head_dim asked for (24, 40, 72: a main chunk + a tail; 32, 64, 128 powers of
# two), S = 1, odd S, H = 1, a batch of 3.
SHAPES = [(2, 5, 3, 24), (1, 1, 4, 32), (3, 7, 1, 40), (2, 9, 2, 64), (1, 3, 5, 72), (2, 4, 2, 128),
          (1, 1, 1, 128)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
ULP = {torch.float32: 1e-5, torch.bfloat16: BF16_REL, torch.float16: FP16_REL}
# weight / RoPE combinations: Flux (both), SD3.5 (weight only), and the two partial forms.
VARIANTS = ["weight_rope", "weight", "rope", "plain"]


def make_inputs(shape, dtype, variant, device, seed=0):
    """x as the keys of a fused (B, S, 3, H, D) qkv output (a strided view), a weight near 1, RoPE tables."""
    B, S, H, D = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, S, 3, H, D, generator=gen) * 2 + 0.3).to(device, dtype)[:, :, 1]
    weight = (1 + 0.2 * torch.randn(D, generator=gen)).to(device, dtype) if "weight" in variant else None
    cos, sin = (t.to(device) for t in rope_tables(S, D, "cpu", gen)) if "rope" in variant else (None, None)
    return x, weight, cos, sin


def _swap_pairs(y: torch.Tensor) -> torch.Tensor:
    return y.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def error_bound(x, weight, cos, sin, dtype) -> torch.Tensor:
    """The per-element bound of the module docstring on |op - oracle| (float64, CPU)."""
    u = ULP[dtype]
    y = oracle.rms_norm_rope(x, weight, None, None, EPS).cpu()
    out = oracle.rms_norm_rope(x, weight, cos, sin, EPS).cpu()
    if cos is None:
        spread = y.abs()
        roundings = 2 if weight is not None and weight.dtype != torch.float32 else 1
    else:
        c, s = cos.double().cpu()[:, None], sin.double().cpu()[:, None]
        spread = (y * c).abs() + (_swap_pairs(y) * s).abs()
        roundings = 1
    if dtype == torch.float32:
        roundings = 0
    return u * out.abs() + (roundings * u + 1e-5) * spread + 1e-6


def check_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound elementwise, reporting the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    excess = diff - bound
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: |diff| {diff.flatten()[worst].item():.3e} exceeds the bound {bound.flatten()[worst].item():.3e} "
        f"at flat index {worst}: actual {actual.flatten()[worst].item()!r}, expected "
        f"{expected.flatten()[worst].item()!r}; max |diff| {diff.max().item():.3e}")


# ------------------------------------------------------------------------- reference vs diffusers


def _diffusers_path(x, weight, cos, sin):
    """The diffusers modules the op replaces: SD3.5's q norm, or Flux's q norm then apply_rotary_emb."""
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    flux = pytest.importorskip("diffusers.models.transformers.transformer_flux")
    _, _, H, D = x.shape
    if cos is None:
        attn = attention_processor.Attention(query_dim=H * D, heads=H, dim_head=D, qk_norm="rms_norm", eps=EPS,
                                             elementwise_affine=weight is not None)
    else:
        attn = flux.FluxAttention(query_dim=H * D, heads=H, dim_head=D, eps=EPS, elementwise_affine=weight is not None)
    norm = attn.norm_q.to(x.device, x.dtype)
    if weight is not None:
        with torch.no_grad():
            norm.weight.copy_(weight)
    with torch.no_grad():
        y = norm(x)
        if cos is not None:
            y = embeddings.apply_rotary_emb(y, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    return y


def check_diffusers_match(actual, want, what, max_mismatch=0.01):
    """Within 1 output ulp of diffusers everywhere, and equal almost everywhere: the same roundings
    give the same values except where another order of the fp32 sums tips one (rare); a missing or
    extra rounding differs in about a quarter of the bf16 elements."""
    rtol = 1e-6 if want.dtype == torch.float32 else ULP[want.dtype]
    torch.testing.assert_close(actual, want, atol=1e-6, rtol=rtol, msg=lambda m: f"{what}: {m}")
    if want.dtype != torch.float32:
        mismatch = (actual != want).float().mean().item()
        assert mismatch <= max_mismatch, f"{what}: {mismatch:.1%} of the elements differ from diffusers by 1 ulp"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 24), (1, 3, 2, 128)], ids=str)
def test_reference_and_eager_are_diffusers(shape, dtype, variant, device):
    x, weight, cos, sin = make_inputs(shape, dtype, variant, device)
    want = _diffusers_path(x, weight, cos, sin)
    assert want.dtype == dtype
    check_diffusers_match(rms_norm_rope_ref(x, weight, cos, sin, EPS), want, f"reference vs diffusers {variant}")
    check_diffusers_match(rms_norm_rope_eager(x, weight, cos, sin, EPS), want, f"eager vs diffusers {variant}")
    out = torch.empty(*x.shape[:-1], x.shape[-1] + 2, device=device, dtype=dtype)[..., :-2]
    assert rms_norm_rope_eager(x, weight, cos, sin, EPS, out=out) is out  # as the op, for plain_torch_ops
    check_diffusers_match(out, want, f"eager out= vs diffusers {variant}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter truncates instead of rounding")
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_kernel_is_diffusers_on_cuda(variant):
    """On a GPU the kernel rounds like the diffusers modules (round to nearest even)."""
    x, weight, cos, sin = make_inputs((2, 64, 4, 128), torch.bfloat16, variant, "cuda")
    with mk.use_backend("triton"):
        got = mk.rms_norm_rope(x, weight, cos, sin, EPS)
    check_diffusers_match(got, _diffusers_path(x, weight, cos, sin), f"triton vs diffusers {variant}")


def test_diffusers_roundings_are_the_ones_modelled():
    """The two diffusers norms really round differently in bf16 (else one rule would do): SD3.5's
    ``RMSNorm`` rounds before the weight, Flux's ``torch.nn.RMSNorm`` does not."""
    x, weight, _, _ = make_inputs((2, 9, 2, 64), torch.bfloat16, "weight", "cpu")
    cos, sin = torch.ones(9, 64), torch.zeros(9, 64)  # the identity rotation: Flux's norm alone
    sd3 = _diffusers_path(x, weight, None, None)
    flux = _diffusers_path(x, weight, cos, sin)
    assert (sd3 != flux).float().mean().item() > 0.05
    torch.testing.assert_close(rms_norm_rope_ref(x, weight, cos, sin), flux, atol=1e-6, rtol=BF16_REL)


def test_reference_within_bound_of_oracle_and_bound_catches_mistakes():
    """The reference meets the bound; a flipped sine, a swapped pair or a dropped weight does not."""
    x, weight, cos, sin = make_inputs((2, 5, 3, 72), torch.bfloat16, "weight_rope", "cpu")
    want, bound = oracle.rms_norm_rope(x, weight, cos, sin, EPS), error_bound(x, weight, cos, sin, torch.bfloat16)
    check_within(rms_norm_rope_ref(x, weight, cos, sin, EPS), want, bound, "reference")
    for name, wrong in (("sin sign", rms_norm_rope_ref(x, weight, cos, -sin)),
                        ("pair order", _swap_pairs(rms_norm_rope_ref(_swap_pairs(x), weight, cos, sin))),
                        ("no weight", rms_norm_rope_ref(x, None, cos, sin))):
        with pytest.raises(AssertionError, match="exceeds the bound"):
            check_within(wrong, want, bound, name)


# ------------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(backend, device, shape, dtype, variant):
    x, weight, cos, sin = make_inputs(shape, dtype, variant, device)
    with mk.ops.record_dispatch() as calls:
        y = mk.rms_norm_rope(x, weight, cos, sin, EPS)
    assert set(calls) == {(OP, backend)}, calls
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    check_within(y, oracle.rms_norm_rope(x, weight, cos, sin, EPS), error_bound(x, weight, cos, sin, dtype),
                 f"{OP}[{backend}] {shape} {dtype} {variant}")


def test_bf16_x_with_fp32_weight(backend, device):
    """A bf16 model with an fp32 norm weight: no rounding before the product, output bf16."""
    x, _, cos, sin = make_inputs((2, 3, 2, 40), torch.bfloat16, "rope", device)
    weight = 1 + 0.2 * torch.randn(40, device=device)
    for c, s in ((cos, sin), (None, None)):
        y = mk.rms_norm_rope(x, weight, c, s)
        assert y.dtype == torch.bfloat16
        check_within(y, oracle.rms_norm_rope(x, weight, c, s, EPS), error_bound(x, weight, c, s, torch.bfloat16),
                     f"bf16 x, fp32 weight, rope={c is not None}")


def _fused_projection_view(B, S, H, D, extra, device, dtype, part):
    """Heads ``part`` (0 = q, 1 = k) of a (B, S, 3*H*D + extra) fused projection output (e.g. Flux's
    single block ``[q | k | v | mlp]``), as (B, S, H, D): strides (S*N, N, D, 1)."""
    N = 3 * H * D + extra
    fused = (torch.randn(B, S, N) * 1.5).to(device, dtype)
    return fused[..., part * H * D:(part + 1) * H * D].unflatten(-1, (H, D))


@pytest.mark.parametrize("layout", ["qkv5d", "fused_mlp", "heads_first", "padded_heads"])
def test_strided_inputs(backend, device, layout):
    """x as a view with only a unit last stride: no copy is needed and the result is the same."""
    B, S, H, D = 2, 5, 3, 40
    if layout == "qkv5d":
        x = torch.randn(B, S, 3, H, D, device=device)[:, :, 2]
    elif layout == "fused_mlp":
        x = _fused_projection_view(B, S, H, D, 4 * H * D + 5, device, torch.float32, part=1)
    elif layout == "heads_first":
        x = torch.randn(B, H, S, D, device=device).transpose(1, 2)
    else:
        x = torch.randn(B, S, H, D + 8, device=device)[..., 3:D + 3]  # an odd row offset
    assert not x.is_contiguous() and x.stride(-1) == 1
    _, weight, cos, sin = make_inputs((B, S, H, D), torch.float32, "weight_rope", device)
    y = mk.rms_norm_rope(x, weight, cos, sin)
    check_within(y, oracle.rms_norm_rope(x, weight, cos, sin), error_bound(x, weight, cos, sin, torch.float32), layout)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_out_writes_a_joint_buffer_and_nothing_else(backend, device, dtype):
    """Flux's two streams into one joint [text | image] buffer without a cat: each call writes its
    slice only (the rest keeps its sentinel), and the joint result is the op on the joint sequence."""
    B, S_txt, S_img, H, D = 2, 3, 5, 2, 24
    x_all, weight, cos, sin = make_inputs((B, S_txt + S_img, H, D), dtype, "weight_rope", device)
    txt = x_all[:, :S_txt].clone()
    img = _fused_projection_view(B, S_img, H, D, 7, device, dtype, part=0)
    x_all = torch.cat([txt, img], dim=1)
    joint = torch.full((B, S_txt + S_img, H, D + 4), -7.0, device=device, dtype=dtype)  # padded rows
    out_img = joint[:, S_txt:, :, :D]
    returned = mk.rms_norm_rope(img, weight, cos[S_txt:], sin[S_txt:], out=out_img)
    assert returned is out_img
    assert bool((joint[:, :S_txt] == -7.0).all()) and bool((joint[..., D:] == -7.0).all()), "wrote outside out"
    mk.rms_norm_rope(txt, weight, cos[:S_txt], sin[:S_txt], out=joint[:, :S_txt, :, :D])
    assert bool((joint[..., D:] == -7.0).all()), "wrote into the padding"
    check_within(joint[..., :D], oracle.rms_norm_rope(x_all, weight, cos, sin),
                 error_bound(x_all, weight, cos, sin, dtype), "joint buffer")
    check_within(joint[..., :D], mk.rms_norm_rope(x_all, weight, cos, sin), 2 * error_bound(
        x_all, weight, cos, sin, dtype), "out= vs a new tensor")


def test_out_refuses_inputs_that_require_grad(device):
    x, weight, cos, sin = make_inputs((1, 2, 1, 8), torch.float32, "weight_rope", device)
    weight.requires_grad_()
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="^rms_norm_rope: out= does not support automatic differentiation"):
        mk.rms_norm_rope(x, weight, cos, sin, out=out)
    with torch.no_grad():
        assert mk.rms_norm_rope(x, weight, cos, sin, out=out) is out


@pytest.mark.parametrize("shape", [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)], ids=["B0", "S0", "H0"])
def test_empty(backend, device, shape):
    x, weight, cos, sin = make_inputs(shape, torch.float32, "weight_rope", device)
    assert mk.rms_norm_rope(x, weight, cos, sin).shape == shape
    assert mk.rms_norm_rope(x, weight, cos, sin, out=torch.empty(shape, device=device)).shape == shape


def test_gradients_flow_to_x_and_weight(device):
    """The backward (the reference's, in fp32) against autograd through the float64 oracle; the
    full sweep is tests/kernels/test_backward.py."""
    x, weight, cos, sin = make_inputs((2, 3, 2, 24), torch.float32, "weight_rope", device)
    x, weight = x.detach().requires_grad_(), weight.requires_grad_()
    g = torch.randn(2, 3, 2, 24, device=device)
    got = torch.autograd.grad(mk.rms_norm_rope(x, weight, cos, sin), (x, weight), g)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = torch.autograd.grad(oracle.rms_norm_rope(x64, w64, cos, sin), (x64, w64), g.double())
    for name, a, b in zip(("dx", "dweight"), got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- bad inputs


def _bad(**changes):
    x, weight, cos, sin = make_inputs((2, 4, 3, 8), torch.float32, "weight_rope", "cpu")
    args = {"x": x, "weight": weight, "cos": cos, "sin": sin}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(cos=torch.ones(4, 6)), ValueError, r"cos must be \(S, D\)=\(4, 8\), got \(4, 6\)"),
        (_bad(sin=torch.ones(5, 8)), ValueError, r"sin must be \(S, D\)=\(4, 8\), got \(5, 8\)"),
        (_bad(sin=None), ValueError, r"cos and sin must be given together .* got cos=Tensor, sin=NoneType"),
        (_bad(cos=None), ValueError, r"cos and sin must be given together .* got cos=NoneType, sin=Tensor"),
        (_bad(cos=torch.ones(4, 8, dtype=torch.bfloat16)), TypeError, r"cos must be float32 .*got torch.bfloat16"),
        (_bad(cos=torch.ones(8, 4).T), ValueError, r"cos must have unit stride in its last dim, got strides \(1, 4\)"),
        (_bad(x=torch.zeros(2, 4, 3, 7), weight=None, cos=torch.ones(4, 7), sin=torch.ones(4, 7)), ValueError,
         r"D must be even with RoPE \(pairs \(2i, 2i\+1\) rotate\), got D=7"),
        (_bad(x=torch.zeros(2, 4, 8, 3).transpose(-1, -2)), ValueError,
         r"x must have unit stride in its last dim, got strides \(96, 24, 1, 3\)"),
        (_bad(x=torch.zeros(4, 3, 8)), ValueError, r"x must be 4-D, got shape \(4, 3, 8\)"),
        (_bad(x=torch.zeros(2, 4, 3, 8, dtype=torch.float64)), TypeError, r"x must be float32, float16 or bfloat16"),
        (_bad(x=[0.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (_bad(weight=torch.ones(6)), ValueError, r"weight must be \(D,\)=\(8,\), got \(6,\)"),
        (_bad(weight=torch.ones(8, 2)[:, 0]), ValueError, r"weight must have unit stride in its last dim"),
        (_bad(out=torch.zeros(2, 4, 3, 8, dtype=torch.bfloat16)), TypeError,
         r"out must have x's dtype \(torch.float32\), got torch.bfloat16"),
        (_bad(out=torch.zeros(2, 4, 3, 6)), ValueError, r"out must have x's shape \(B, S, H, D\)=\(2, 4, 3, 8\)"),
        (_bad(out=torch.zeros(2, 4, 8, 3).transpose(-1, -2)), ValueError, r"out must have unit stride in its last"),
        (_bad(out="buffer"), TypeError, r"out must be a torch.Tensor or None, got str"),
        (_bad(eps=0.0), ValueError, r"eps must be a positive finite float, got 0.0"),
    ],
    ids=["cos_shape", "sin_shape", "cos_without_sin", "sin_without_cos", "cos_bf16", "cos_strided", "odd_D_rope",
         "x_last_dim_strided", "x_3d", "x_float64", "x_list", "weight_shape", "weight_strided", "out_dtype",
         "out_shape", "out_strided", "out_str", "eps_zero"],
)
def test_bad_inputs_raise_one_line_errors(args, error, match):
    with pytest.raises(error, match=f"^{OP}: {match}") as info:
        mk.rms_norm_rope(**args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("D", [1, 13])
def test_odd_d_without_rope_is_fine(backend, device, D):
    x = torch.randn(2, 3, 2, D, device=device)
    weight = torch.randn(D, device=device)
    for w in (None, weight):
        check_within(mk.rms_norm_rope(x, w), oracle.rms_norm_rope(x, w), error_bound(x, w, None, None, torch.float32),
                     f"D={D} weight={w is not None}")


# ------------------------------------------------------------------------- the Triton launcher


@pytest.mark.parametrize("D", [2, 24, 40, 72, 128, 200, 256])
def test_block_m_sweep_and_no_store_past_the_rows(D):
    """Every BLOCK_M (a partial last row tile or not) matches, writing nothing past the output;
    D = 200 has a masked tail (128 + 128 lanes for 200 columns)."""
    triton_kernels, device = triton_or_skip()
    B, S, H = 1, 3, 3  # 9 rows
    x, weight, cos, sin = make_inputs((B, S, H, D), torch.bfloat16, "weight_rope", device)
    want, bound = oracle.rms_norm_rope(x, weight, cos, sin), error_bound(x, weight, cos, sin, torch.bfloat16)
    for block_m in (1, 2, 4, 16):
        buf = torch.full((9 * D + 256,), -7.0, device=device, dtype=torch.bfloat16)
        out = buf[:9 * D].view(B, S, H, D)
        triton_kernels.rms_norm_rope_triton(x, weight, cos, sin, EPS, out=out, config={"BLOCK_M": block_m})
        assert bool((buf[9 * D:] == -7.0).all()), f"BLOCK_M={block_m}: stored past the rows"
        check_within(out, want, bound, f"D={D} BLOCK_M={block_m}")


def test_settings_hold_whole_rows_in_even_chunks():
    """The row chunks of every even D up to 256 are even (no RoPE pair straddles the two chunks)."""
    settings = pytest.importorskip("mosaic_kernels.triton.settings")
    for D in range(2, 257, 2):
        cfg = settings.row_settings(OP, D, torch.bfloat16)
        assert cfg["BLOCK_D"] % 2 == 0 and cfg["TAIL_D"] % 2 == 0 and D <= cfg["BLOCK_D"] + cfg["TAIL_D"], (D, cfg)


# ------------------------------------------------------------------------ custom ops and compile


def test_opcheck_both_custom_ops(device):
    x, weight, cos, sin = make_inputs((2, 3, 2, 24), torch.float32, "weight_rope", device)
    torch.library.opcheck(torch.ops.mosaic.rms_norm_rope.default, (x, weight, cos, sin, EPS))
    torch.library.opcheck(torch.ops.mosaic.rms_norm_rope.default, (x, None, None, None, EPS))
    out = torch.empty(2, 3, 2, 30, device=device)[..., :24]
    torch.library.opcheck(torch.ops.mosaic.rms_norm_rope_out.default, (out, x, weight, cos, sin, EPS))


def test_torch_compile_fullgraph_with_out(device):
    """The joint-buffer pattern traces into one graph (aot_eager on CPU, inductor on CUDA)."""
    torch._dynamo.reset()
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"

    def joint_q(txt, img, weight, cos, sin):
        S_txt = txt.shape[1]
        joint = torch.empty(txt.shape[0], S_txt + img.shape[1], *txt.shape[2:], device=txt.device, dtype=txt.dtype)
        mk.rms_norm_rope(txt, weight, cos[:S_txt], sin[:S_txt], out=joint[:, :S_txt])
        mk.rms_norm_rope(img, weight, cos[S_txt:], sin[S_txt:], out=joint[:, S_txt:])
        return joint * 2.0

    x, weight, cos, sin = make_inputs((2, 7, 2, 24), torch.float32, "weight_rope", device)
    txt, img = x[:, :3], x[:, 3:]
    compiled = torch.compile(joint_q, fullgraph=True, backend=compile_backend)
    check_within(compiled(txt, img, weight, cos, sin), 2.0 * oracle.rms_norm_rope(x, weight, cos, sin),
                 2.0 * error_bound(x, weight, cos, sin, torch.float32), "compiled joint buffer")


def test_bench_case_runs_the_model_shapes():
    """Flux-dev (B=1, 4096+512 tokens, 24 heads of 128, RoPE) and SD3.5-Large (CFG batch 2, 4096+333
    tokens, 38 heads of 64, no RoPE), each at batch 1."""
    case = mk.ops.BENCH_CASES[OP]
    assert case.model_shapes(1) == [(1, 4608, 24, 128, 1), (2, 4429, 38, 64, 0)]
    x, weight, cos, sin = case.make_inputs((1, 3, 2, 8, 0), torch.float32, torch.device("cpu"), torch.Generator())
    assert cos is None and sin is None and x.shape == (1, 3, 2, 8) and not x.is_contiguous()

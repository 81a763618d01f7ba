"""The plain-torch reference (mosaic_kernels.reference) against independent formulations.

The ``torch`` backend *is* the reference, so these are the tests that catch a mistake in
reference.py: each ``*_ref`` against the float64 oracle of ``oracle.py`` (torch's own
``F.layer_norm`` / ``F.gelu(approximate="tanh")`` / ``addcmul`` / ``einsum``), and the
references composed into a DiT block against diffusers' own ``BasicTransformerBlock``
(``AdaLayerNormZero``, ``nn.LayerNorm(elementwise_affine=False)``, the tanh ``GELU`` module,
SDPA attention). Mutating reference.py (dropping the ``1 +`` of a modulation, the gate, or
changing the tanh-GELU constant) fails tests here and in every ``[torch]`` backend test.
"""

from __future__ import annotations

import math

import oracle
import pytest
import torch
import torch.nn.functional as F

from mosaic_kernels import reference as ref

# The reference computes in fp32 and rounds once to the output dtype. Against a float64 oracle:
# fp32 outputs differ by the fp32 rounding of O(1)-O(10) values and of D-term sums (< 1e-5);
# bf16/fp16 outputs are one rounding of a value within 1e-6 of the oracle: <= 1 ulp, and
# rtol allows 2 ulps (2**-7 |v| bf16, 2**-10 |v| fp16), atol covers values that round to ~0.
TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 2 * 2.0**-7, id="bf16"),
    pytest.param(torch.float16, 1e-5, 2 * 2.0**-10, id="fp16"),
]
ROW_SHAPES = [(2, 5, 72), (3, 1, 1), (1, 4, 1152), (2, 3, 13)]


def _rnd(*shape, scale=1.0, dtype=torch.float32):
    return (scale * torch.randn(*shape)).to(dtype)


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_ln_modulate_ref(shape, dtype, atol, rtol, check_close):
    B, L, D = shape
    x = _rnd(B, L, D, scale=2, dtype=dtype) + 0.5
    shift, scale = _rnd(B, D, dtype=dtype), _rnd(B, D, scale=0.5, dtype=dtype)
    y = ref.ln_modulate_ref(x, shift, scale, 1e-6)
    assert y.dtype == dtype
    check_close(y, oracle.ln_modulate(x, shift, scale, 1e-6), atol, rtol, f"ln_modulate_ref {shape} {dtype}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_gated_residual_ref(shape, dtype, atol, rtol, check_close):
    B, L, D = shape
    res, gate, y = _rnd(B, L, D, dtype=dtype), _rnd(B, D, dtype=dtype), _rnd(B, L, D, scale=3, dtype=dtype)
    out = ref.gated_residual_ref(res, gate, y)
    assert out.dtype == dtype
    check_close(out, oracle.gated_residual(res, gate, y), atol, rtol, f"gated_residual_ref {shape} {dtype}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_gated_residual_ln_modulate_ref(shape, dtype, atol, rtol, check_close):
    B, L, D = shape
    inputs = (_rnd(B, L, D, scale=2, dtype=dtype), _rnd(B, D, dtype=dtype), _rnd(B, L, D, dtype=dtype),
              _rnd(B, D, dtype=dtype), _rnd(B, D, scale=0.5, dtype=dtype))
    h, normed = ref.gated_residual_ln_modulate_ref(*inputs, 1e-6)
    h_want, normed_want = oracle.gated_residual_ln_modulate(*inputs, 1e-6)
    check_close(h, h_want, atol, rtol, f"gated_residual_ln_modulate_ref h {shape} {dtype}")
    check_close(normed, normed_want, atol, rtol, f"gated_residual_ln_modulate_ref normed {shape} {dtype}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gelu_ref(bias, dtype, atol, rtol, check_close):
    x, w = _rnd(2, 7, 48, dtype=dtype), _rnd(40, 48, scale=48**-0.5, dtype=dtype)
    b = _rnd(40, dtype=dtype) if bias else None
    y = ref.linear_gelu_ref(x, w, b)
    assert y.dtype == dtype and y.shape == (2, 7, 40)
    check_close(y, oracle.linear_gelu(x, w, b), atol, rtol, f"linear_gelu_ref {dtype}")


@pytest.mark.parametrize("dtype, atol, rtol", TOLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gated_residual_ref(bias, dtype, atol, rtol, check_close):
    x, w = _rnd(2, 7, 48, dtype=dtype), _rnd(40, 48, scale=48**-0.5, dtype=dtype)
    b = _rnd(40, dtype=dtype) if bias else None
    gate, res = _rnd(2, 40, dtype=dtype), _rnd(2, 7, 40, dtype=dtype)
    out = ref.linear_gated_residual_ref(x, w, b, gate, res)
    assert out.dtype == dtype
    check_close(out, oracle.linear_gated_residual(x, w, b, gate, res), atol, rtol, f"linear_gated_residual_ref {dtype}")


@pytest.mark.parametrize("B, L, H, hd", [(2, 9, 3, 8), (1, 1, 2, 72), (3, 4, 1, 36)], ids=str)
def test_attention_ref(B, L, H, hd, check_close):
    qkv = _rnd(B, L, 3 * H * hd)
    check_close(ref.attention_ref(qkv, H), oracle.attention(qkv, H), 1e-5, 1e-5, f"attention_ref {(B, L, H, hd)}")


def test_gelu_tanh_ref_is_torchs_tanh_gelu_including_non_finite():
    """gelu_tanh_ref equals torch's F.gelu(approximate="tanh") on [-8, 8], at fp32 extremes, and
    on NaN/+-inf: gelu(+inf) = +inf, gelu(-inf) = NaN and gelu(NaN) = NaN are torch's semantics
    (0.5 * x * (1 + tanh(...)) at x = -inf is -inf * 0), which the kernels follow."""
    z = torch.cat([torch.linspace(-8, 8, 4001), torch.tensor([
        -1e30, -3e12, -1e4, -100.0, -10.0, 10.0, 100.0, 1e4, 3e12, 1e30, 0.0, -0.0,
        float("inf"), float("-inf"), float("nan")])])
    got, want = ref.gelu_tanh_ref(z), F.gelu(z, approximate="tanh")
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (z[torch.isnan(got) != torch.isnan(want)])
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-6)
    assert got[-3] == math.inf and torch.isnan(got[-2]) and torch.isnan(got[-1])
    # tight enough to see the tanh constant: 0.044715 -> 0.0447 moves gelu(2) by ~1e-5
    assert (F.gelu(z[:4001]) - want[:4001]).abs().max() > 1e-4, "tanh and erf GELU must differ measurably"


def test_ada_layer_norm_zero_is_ln_modulate_ref(check_close):
    """diffusers' AdaLayerNormZero (the DiT block's norm1) on a given embedding: its first output
    is ln_modulate_ref with the (shift_msa, scale_msa) chunks, eps 1e-6."""
    from diffusers.models.normalization import AdaLayerNormZero

    B, L, D = 2, 5, 24
    norm = AdaLayerNormZero(D).eval()
    norm.silu, norm.linear = torch.nn.Identity(), torch.nn.Identity()  # emb passes through: 6 chunks
    emb = torch.randn(B, 6 * D)
    x = 2 * torch.randn(B, L, D) + 0.5
    with torch.no_grad():
        x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm(x, emb=emb)
    shift_msa, scale_msa = emb.chunk(6, dim=1)[:2]
    check_close(ref.ln_modulate_ref(x, shift_msa, scale_msa, 1e-6), x_mod, 1e-5, 1e-5, "AdaLayerNormZero")
    check_close(gate_msa, emb.chunk(6, dim=1)[2], 0, 0, "gate_msa chunk")


def test_diffusers_tanh_gelu_module_is_linear_gelu_ref(check_close):
    """diffusers' GELU(approximate="tanh") (the DiT MLP's fc1 + activation, "gelu-approximate")."""
    from diffusers.models.activations import GELU

    fc1 = GELU(24, 40, approximate="tanh").eval()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        want = fc1(x)
    check_close(ref.linear_gelu_ref(x, fc1.proj.weight, fc1.proj.bias), want, 1e-5, 1e-5, "diffusers GELU")


@pytest.mark.parametrize("fused", [True, False], ids=["fused_boundary", "separate_ops"])
def test_references_compose_to_diffusers_dit_block(fused, check_close):
    """Every reference in its role in a DiT block (adaLN-Zero), against diffusers'
    BasicTransformerBlock with the DiT settings: ln_modulate (norm1), attention (attn1), the gated
    residual + norm2 modulation (fused, or gated_residual + ln_modulate), linear_gelu (fc1) and
    linear_gated_residual (fc2)."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    D, H = 32, 2
    block = BasicTransformerBlock(D, H, D // H, activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                  attention_bias=True, norm_type="ada_norm_zero",
                                  norm_elementwise_affine=False, norm_eps=1e-5).eval()
    for p in block.parameters():  # diffusers zero-initialises nothing here, but make every weight count
        p.data.normal_(0, 0.3)
    B, L = 2, 6
    x = torch.randn(B, L, D)
    t, labels = torch.tensor([3, 7]), torch.tensor([1, 4])
    with torch.no_grad():
        want = block(x, timestep=t, class_labels=labels)
        n1 = block.norm1
        emb = n1.linear(n1.silu(n1.emb(t, labels, hidden_dtype=x.dtype)))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    attn = block.attn1
    w_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    b_qkv = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    fc1, fc2 = block.ff.net[0].proj, block.ff.net[2]
    with torch.no_grad():
        h = ref.ln_modulate_ref(x, shift_msa, scale_msa, 1e-6)  # AdaLayerNormZero's eps
        a = ref.attention_ref(F.linear(h, w_qkv, b_qkv), H)
        proj = F.linear(a, attn.to_out[0].weight, attn.to_out[0].bias)
        if fused:
            x1, h2 = ref.gated_residual_ln_modulate_ref(x, gate_msa, proj, shift_mlp, scale_mlp, 1e-5)
        else:
            x1 = ref.gated_residual_ref(x, gate_msa, proj)
            h2 = ref.ln_modulate_ref(x1, shift_mlp, scale_mlp, 1e-5)  # norm3's eps (norm_eps)
        out = ref.linear_gated_residual_ref(ref.linear_gelu_ref(h2, fc1.weight, fc1.bias), fc2.weight, fc2.bias,
                                            gate_mlp, x1)
    check_close(out, want, 2e-5, 2e-5, f"references vs diffusers BasicTransformerBlock (fused={fused})")


def test_oracle_rejects_known_wrong_variants(check_close):
    """Negative controls: the oracle and these tolerances see each classic mistake."""
    x, shift, scale = torch.randn(2, 3, 16), torch.randn(2, 16), 0.5 * torch.randn(2, 16)
    want = oracle.ln_modulate(x, shift, scale)
    wrong_mod = F.layer_norm(x, (16,), eps=1e-6) * scale[:, None] + shift[:, None]  # no "1 +"
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(wrong_mod, want, 1e-5, 1e-5, "missing 1 +")
    res, gate, y = torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 3, 16)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(res + y, oracle.gated_residual(res, gate, y), 1e-5, 1e-5, "missing gate")
    w = torch.randn(8, 16) / 4
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(F.gelu(F.linear(x, w)), oracle.linear_gelu(x, w, None), 1e-5, 1e-5, "erf GELU")

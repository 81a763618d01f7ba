"""ln_modulate_table: y = LN(x) * (1 + scale + scale_table) + shift + shift_table (PixArt's
adaLN-single), every backend against the float64 oracle.

Backend tests compare with ``oracle.ln_modulate_table`` (float64, the tables broadcast onto the
vectors as diffusers does), not with the reference: the torch backend *is* the reference.
Triton-only tests use the reference, which ``test_reference.py``-style checks below tie to the
oracle and to diffusers' ``BasicTransformerBlock`` (norm1 of a PixArt block).
"""

from __future__ import annotations

import random

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import ln_modulate_table_ref
from tolerances import BF16_REL, DTYPE_TOLS  # noqa: F401
from triton_backend import triton_or_skip

OP = "ln_modulate_table"

# (B, L, D): PixArt width 1152 (1024 + 128), its head_dim 72, a pruned-free width 1152 at a few
# tokens of the 4096 of 1024 px, primes, D = 1 and 2, 1025 (a one-column tail), 2301 (masked tail).
SHAPES = [(2, 8, 1152), (3, 7, 72), (1, 1, 1000), (2, 3, 13), (5, 1, 1), (1, 3, 2), (3, 1, 1025), (2, 2, 2301)]
# Randomized awkward shapes (seeded): odd batches, prime token counts and widths.
_rng = random.Random(21)
SHAPES += [(_rng.randint(1, 4), _rng.choice([1, 3, 5, 7]), _rng.choice([3, 17, 71, 97, 193, 577])) for _ in range(4)]


def make_inputs(shape, dtype, device):
    """x, and shift/scale as chunks 0 and 1 of one (B, 6D) adaLN-single output (row stride 6D)."""
    B, L, D = shape
    x = (torch.randn(B, L, D) * 2 + 0.5).to(device, dtype)
    t_emb = (0.5 * torch.randn(B, 6 * D)).to(device, dtype)
    table = (torch.randn(6, D) / D ** 0.5).to(device, dtype)  # diffusers' init scale
    return x, t_emb[:, :D], t_emb[:, D:2 * D], table[0], table[1]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(backend, device, shape, dtype, atol, rtol, check_close):
    inputs = make_inputs(shape, dtype, device)
    y = mk.ln_modulate_table(*inputs, eps=1e-6)
    assert y.dtype == dtype and y.shape == inputs[0].shape
    check_close(y, oracle.ln_modulate_table(*inputs, 1e-6), atol, rtol, f"{OP}[{backend}] {shape} {dtype}")


def test_reference_matches_diffusers_pixart_norm1(check_close):
    """diffusers' BasicTransformerBlock (ada_norm_single) forms ``scale_shift_table[None] +
    timestep.reshape(B, 6, -1)`` and modulates norm1 with chunks 0 and 1: the reference's math."""
    B, L, D = 2, 5, 24
    x, t_emb, table = torch.randn(B, L, D), torch.randn(B, 6 * D), torch.randn(6, D)
    shift_msa, scale_msa = (table[None] + t_emb.reshape(B, 6, -1)).chunk(6, dim=1)[:2]
    want = torch.nn.functional.layer_norm(x, (D,), eps=1e-6) * (1 + scale_msa) + shift_msa
    got = ln_modulate_table_ref(x, t_emb[:, :D], t_emb[:, D:2 * D], table[0], table[1], 1e-6)
    check_close(got, want, 1e-5, 1e-5, "diffusers norm1")
    check_close(got, oracle.ln_modulate_table(x, t_emb[:, :D], t_emb[:, D:2 * D], table[0], table[1]), 1e-5, 1e-5,
                "oracle")


def test_tolerance_rejects_a_dropped_table(device, check_close):
    """The fp32 tolerance catches a kernel that forgot the table row (diffusers' init: ~1/sqrt(D))."""
    x, shift, scale, st, sc = make_inputs((2, 3, 72), torch.float32, device)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        wrong = ln_modulate_table_ref(x, shift, scale, st * 0, sc)
        check_close(wrong, oracle.ln_modulate_table(x, shift, scale, st, sc), 1e-5, 1e-5, "negative control")


def test_bad_inputs_raise():
    x, shift, scale, st, sc = make_inputs((2, 3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"shift_table must be \(D,\)=\(8,\), got \(9,\)"):
        mk.ln_modulate_table(x, shift, scale, torch.zeros(9), sc)
    with pytest.raises(ValueError, match="scale_table must be 1-D"):
        mk.ln_modulate_table(x, shift, scale, st, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="scale_table must have unit stride"):
        mk.ln_modulate_table(x, shift, scale, st, torch.zeros(16)[::2])
    with pytest.raises(TypeError, match="shift_table must be float32, float16 or bfloat16"):
        mk.ln_modulate_table(x, shift, scale, st.double(), sc)
    with pytest.raises(ValueError, match="x must be contiguous"):
        mk.ln_modulate_table(x.transpose(0, 1).contiguous().transpose(0, 1), shift, scale, st, sc)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        mk.ln_modulate_table(x, shift, scale, st, sc, eps=float("nan"))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS[:2])
@pytest.mark.parametrize("D", [1, 13, 72, 1025, 1152, 2301])
def test_block_m_sweep(D, dtype, atol, rtol, check_close):
    """Every BLOCK_M (9 rows: 2, 4 and 8 leave a partial last tile) within the reference's tolerance."""
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), dtype, device)
    expected = ln_modulate_table_ref(*(t.float() for t in inputs), 1e-6)
    for block_m in (1, 2, 4, 16) if dtype == torch.float32 else (2, 16):
        y = triton_kernels.ln_modulate_table_triton(*inputs, 1e-6, config={"BLOCK_M": block_m})
        check_close(y, expected, atol, rtol, f"{OP} D={D} BLOCK_M={block_m} {dtype}")


@pytest.mark.parametrize("D", [13, 1152, 2301])
def test_no_store_past_the_rows(D, check_close):
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), torch.float32, device)
    buf = torch.full((9 * D + 4096,), -7.0, device=device)
    out = buf[:9 * D].view(3, 3, D)
    triton_kernels.ln_modulate_table_triton(*inputs, 1e-6, out=out, config={"BLOCK_M": 4})
    assert bool((buf[9 * D:] == -7.0).all()), "stored past the rows"
    check_close(out, ln_modulate_table_ref(*inputs, 1e-6), 1e-5, 1e-5, f"{OP} D={D}")


def test_opcheck(device):
    torch.library.opcheck(torch.ops.mosaic.ln_modulate_table.default, (*make_inputs((2, 3, 40), torch.float32,
                                                                                    device), 1e-6))


def test_bench_case_has_pixart_sigma_shapes():
    """The benchmark case runs PixArt-Sigma's 1024 px norm: 4096 tokens of width 1152 per image."""
    assert (2, 4096, 1152) in mk.ops.BENCH_CASES[OP].model_shapes(2)

"""gated_residual_ln_modulate_table: h = res + (gate + gate_table) * y, then the next adaLN-single
norm (PixArt's block boundary), every backend against the float64 oracle."""

from __future__ import annotations

import random

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import gated_residual_ln_modulate_table_ref, ln_modulate_table_ref
from tolerances import DTYPE_TOLS
from triton_backend import triton_or_skip

OP = "gated_residual_ln_modulate_table"

SHAPES = [(2, 8, 1152), (3, 7, 72), (1, 1, 1000), (2, 3, 13), (5, 1, 1), (1, 3, 2), (3, 1, 1025), (2, 2, 2301)]
_rng = random.Random(2121)
SHAPES += [(_rng.randint(1, 4), _rng.choice([1, 3, 5, 7]), _rng.choice([3, 17, 71, 97, 193, 577])) for _ in range(4)]


def make_inputs(shape, dtype, device):
    """The end of block i (gate_mlp: chunk 5) and the start of block i + 1 (chunks 0 and 1): every
    vector a row-strided chunk of one (B, 6D) adaLN-single output, every table row of one (6, D)."""
    B, L, D = shape
    res = (2 * torch.randn(B, L, D)).to(device, dtype)
    y = torch.randn(B, L, D).to(device, dtype)
    t_emb = (0.5 * torch.randn(B, 6 * D)).to(device, dtype)
    table = (torch.randn(6, D) / D ** 0.5).to(device, dtype)
    return res, t_emb[:, 5 * D:], y, t_emb[:, :D], t_emb[:, D:2 * D], table[5], table[0], table[1]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(backend, device, shape, dtype, atol, rtol, check_close):
    inputs = make_inputs(shape, dtype, device)
    h, normed = mk.gated_residual_ln_modulate_table(*inputs, eps=1e-6)
    assert h.dtype == normed.dtype == dtype
    h_ref, normed_ref = oracle.gated_residual_ln_modulate_table(*inputs, 1e-6)
    check_close(h, h_ref, atol, rtol, f"{OP}[{backend}] h {shape} {dtype}")
    check_close(normed, normed_ref, atol, rtol, f"{OP}[{backend}] normed {shape} {dtype}")


def test_reference_is_the_composition(check_close):
    """In fp32: the gated update with gate + gate_table, then ln_modulate_table of it."""
    res, gate, y, shift, scale, gt, st, sc = make_inputs((3, 5, 72), torch.float32, "cpu")
    h, normed = gated_residual_ln_modulate_table_ref(res, gate, y, shift, scale, gt, st, sc)
    h2 = res + (gate + gt)[:, None] * y
    check_close(h, h2, 1e-6, 1e-6, "h")
    check_close(normed, ln_modulate_table_ref(h2, shift, scale, st, sc), 1e-5, 1e-5, "normed")


def test_bad_inputs_raise():
    args = list(make_inputs((2, 3, 8), torch.float32, "cpu"))
    with pytest.raises(ValueError, match=r"gate_table must be \(D,\)=\(8,\), got \(7,\)"):
        mk.gated_residual_ln_modulate_table(*args[:5], torch.zeros(7), *args[6:])
    with pytest.raises(ValueError, match="devices must match|gate_table"):
        mk.gated_residual_ln_modulate_table(*args[:5], torch.zeros(8, device="meta"), *args[6:])
    with pytest.raises(TypeError, match="y must have the dtype of res"):
        mk.gated_residual_ln_modulate_table(args[0], args[1], args[2].half(), *args[3:])


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS[:2])
@pytest.mark.parametrize("D", [1, 13, 72, 1025, 1152, 2301])
def test_block_m_sweep(D, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), dtype, device)
    want = gated_residual_ln_modulate_table_ref(*(t.float() for t in inputs), 1e-6)
    for block_m in (1, 2, 4, 16) if dtype == torch.float32 else (2, 16):
        got = triton_kernels.gated_residual_ln_modulate_table_triton(*inputs, 1e-6, config={"BLOCK_M": block_m})
        for name, g, w in zip(("h", "normed"), got, want):
            check_close(g, w, atol, rtol, f"{OP} {name} D={D} BLOCK_M={block_m} {dtype}")


@pytest.mark.parametrize("D", [13, 2301])
def test_no_store_past_the_rows(D, check_close):
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), torch.float32, device)
    bufs = [torch.full((9 * D + 4096,), -7.0, device=device) for _ in range(2)]
    outs = tuple(b[:9 * D].view(3, 3, D) for b in bufs)
    triton_kernels.gated_residual_ln_modulate_table_triton(*inputs, 1e-6, out=outs, config={"BLOCK_M": 4})
    for name, b, o, w in zip(("h", "normed"), bufs, outs, gated_residual_ln_modulate_table_ref(*inputs, 1e-6)):
        assert bool((b[9 * D:] == -7.0).all()), f"{name}: stored past the rows"
        check_close(o, w, 1e-5, 1e-5, f"{OP} {name} D={D}")


def test_opcheck(device):
    torch.library.opcheck(torch.ops.mosaic.gated_residual_ln_modulate_table.default,
                          (*make_inputs((2, 3, 40), torch.float32, device), 1e-6))

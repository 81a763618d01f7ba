"""gated_residual_ln_modulate: (h, LN(h)*(1+scale)+shift) with h = res + gate*y.

Backend tests compare with the float64 ``oracle`` (the torch backend *is* the reference);
Triton-only tests use the reference, which ``test_reference.py`` checks independently.
"""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import gated_residual_ln_modulate_ref, gated_residual_ref, ln_modulate_ref

OP = "gated_residual_ln_modulate"

# (B, L, D): DiT width (1024 + 128 chunks), pruned widths, primes, L = 1, odd B, 1025 (a
# one-column tail), 2301 (2048 + 256, masked tail), 8192 (no tail), D = 1 and 2.
SHAPES = [
    (2, 8, 1152),
    (3, 7, 72),
    (1, 1, 1000),
    (3, 5, 576),
    (2, 3, 13),
    (1, 2, 4608),
    (5, 1, 1),
    (1, 3, 2),
    (3, 1, 1025),
    (3, 2, 2301),
    (1, 2, 8192),
]

SWEEP_D = [1, 3, 13, 72, 1000, 1025, 1152, 2301, 4608, 8192]
SWEEP_BLOCK_M = [1, 2, 4, 8, 16]  # over 9 rows: 2, 4 and 8 leave a partial last row tile

# Both outputs are compared with the fp32 reference of the same inputs. fp32: h may differ by an
# FMA rounding (~1e-6) and normed by the D-term sum order -> 1e-5. bf16/fp16: each output is
# one rounding (truncation in the interpreter) of an fp32 value, <= 1 ulp; rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL  # noqa: E402,F401
from triton_backend import triton_or_skip  # noqa: E402


def make_inputs(shape, dtype, device):
    B, L, D = shape
    res = (2 * torch.randn(B, L, D)).to(device, dtype)
    gate = torch.randn(B, D).to(device, dtype)
    y = torch.randn(B, L, D).to(device, dtype)
    shift = torch.randn(B, D).to(device, dtype)
    scale = (0.5 * torch.randn(B, D)).to(device, dtype)
    return res, gate, y, shift, scale


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, shape, dtype, atol, rtol, check_close):
    inputs = make_inputs(shape, dtype, device)
    h, normed = mk.gated_residual_ln_modulate(*inputs, eps=1e-6)
    assert h.dtype == normed.dtype == dtype
    h_ref, normed_ref = oracle.gated_residual_ln_modulate(*inputs, eps=1e-6)
    check_close(h, h_ref, atol, rtol, f"{OP}[{backend}] h {shape} {dtype}")
    check_close(normed, normed_ref, atol, rtol, f"{OP}[{backend}] normed {shape} {dtype}")


def test_reference_is_the_composition(check_close):
    """In fp32 the fused reference equals gated_residual followed by ln_modulate."""
    res, gate, y, shift, scale = make_inputs((3, 5, 72), torch.float32, "cpu")
    h, normed = gated_residual_ln_modulate_ref(res, gate, y, shift, scale)
    h2 = gated_residual_ref(res, gate, y)
    check_close(h, h2, 0, 0, "h")
    check_close(normed, ln_modulate_ref(h2, shift, scale), 1e-6, 1e-6, "normed")


def test_strided_vectors(backend, device, check_close):
    """gate, shift and scale as chunks of one (B, 6*D) adaLN output."""
    res, _, y, _, _ = make_inputs((3, 5, 72), torch.float32, device)
    gate, shift, scale = torch.randn(3, 6 * 72, device=device).chunk(6, dim=1)[2:5]
    h, normed = mk.gated_residual_ln_modulate(res, gate, y, shift, scale)
    h_ref, normed_ref = oracle.gated_residual_ln_modulate(res, gate, y, shift, scale)
    check_close(h, h_ref, 1e-5, 1e-5, "h")
    check_close(normed, normed_ref, 1e-5, 1e-5, "normed")


@pytest.mark.parametrize(
    "which, bad, error, match",
    [
        ("shift", torch.zeros(2, 71), ValueError, r"shift must be \(B, D\)=\(2, 72\), got \(2, 71\)"),
        ("scale", torch.zeros(3, 72), ValueError, r"scale must be \(B, D\)=\(2, 72\), got \(3, 72\)"),
        ("gate", torch.zeros(2, 72, dtype=torch.float64), TypeError, "gate must be float32"),
        ("res", torch.zeros(2, 72, 5).transpose(1, 2), ValueError, "res must be contiguous"),
    ],
)
def test_bad_inputs_raise(which, bad, error, match):
    args = dict(zip(("res", "gate", "y", "shift", "scale"), make_inputs((2, 5, 72), torch.float32, "cpu")))
    args[which] = bad
    with pytest.raises(error, match=match):
        mk.gated_residual_ln_modulate(**args)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("D", SWEEP_D)
def test_block_m_sweep(D, dtype, atol, rtol, check_close):
    """Every BLOCK_M (dividing the rows or not) matches the reference for every chunk split.

    Configs are compared with the reference only, not bitwise with each other: a row's
    reduction order may depend on the tiling (and CPU float results on the machine).
    """
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), dtype, device)
    h_ref, normed_ref = gated_residual_ln_modulate_ref(*(t.float() for t in inputs), eps=1e-6)
    for block_m in SWEEP_BLOCK_M if dtype == torch.float32 else (2, 16):
        h, normed = triton_kernels.gated_residual_ln_modulate_triton(*inputs, 1e-6, config={"BLOCK_M": block_m})
        check_close(h, h_ref, atol, rtol, f"{OP} h D={D} BLOCK_M={block_m} {dtype}")
        check_close(normed, normed_ref, atol, rtol, f"{OP} normed D={D} BLOCK_M={block_m} {dtype}")


@pytest.mark.parametrize("D", [13, 1152, 2301])
def test_no_store_past_the_rows(D, check_close):
    """A partial last row tile and a masked tail write nothing past either output."""
    triton_kernels, device = triton_or_skip()
    inputs = make_inputs((3, 3, D), torch.float32, device)
    expected = gated_residual_ln_modulate_ref(*inputs, 1e-6)
    for block_m in (4, 16):
        bufs = [torch.full((9 * D + 4096,), -7.0, device=device) for _ in range(2)]
        outs = tuple(b[:9 * D].view(3, 3, D) for b in bufs)
        triton_kernels.gated_residual_ln_modulate_triton(*inputs, 1e-6, out=outs, config={"BLOCK_M": block_m})
        for name, b, o, want in zip(("h", "normed"), bufs, outs, expected):
            assert bool((b[9 * D:] == -7.0).all()), f"{name} BLOCK_M={block_m}: stored past the rows"
            check_close(o, want, 1e-5, 1e-5, f"{OP} {name} D={D} BLOCK_M={block_m}")


def test_tail_statistics_matter(check_close):
    """h whose tail columns (1024..1151 of 1152) have another mean and spread than the main ones."""
    triton_kernels, device = triton_or_skip()
    res, gate, y, _, _ = make_inputs((1, 3, 1152), torch.float32, device)
    res[..., 1024:] += 5.0
    gate[:, 1024:] *= 3.0
    shift, scale = torch.zeros(1, 1152, device=device), torch.zeros(1, 1152, device=device)
    got = triton_kernels.gated_residual_ln_modulate_triton(res, gate, y, shift, scale, 1e-6, config={"BLOCK_M": 2})
    for g, want, name in zip(got, gated_residual_ln_modulate_ref(res, gate, y, shift, scale, 1e-6), ("h", "normed")):
        check_close(g, want, 1e-5, 1e-5, f"tail statistics {name}")


def test_opcheck(device):
    inputs = make_inputs((2, 3, 40), torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.gated_residual_ln_modulate.default, (*inputs, 1e-6))


def _compiled_extension_on_cuda() -> bool:
    return torch.cuda.is_available() and mk.backends("cuda")["cuda"]["available"]


@pytest.mark.skipif(not _compiled_extension_on_cuda(), reason="needs CUDA and the compiled mosaic_C extension")
def test_opcheck_compiled_op():
    res, gate, y, shift, scale = make_inputs((2, 3, 72), torch.bfloat16, "cuda")
    h, out = torch.empty_like(res), torch.empty_like(res)
    torch.library.opcheck(torch.ops.mosaic_C.gated_residual_ln_modulate.default,
                          (h, out, res, gate, y, shift, scale, 1e-6))

"""gated_residual: out = res + gate[:, None, :] * y, every backend against the float64 oracle.

Backend tests compare with ``oracle.gated_residual`` (the torch backend *is* the reference);
Triton-only tests use the reference, which ``test_reference.py`` checks independently.
"""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import gated_residual_ref

OP = "gated_residual"

# (B, L, D): DiT width (1024 + 128 columns), pruned widths, an unaligned 2301, primes, L = 1,
# B = 3, 1025 (a one-column tail), 8192 (eight full 1024-column tiles, no tail).
SHAPES = [
    (2, 8, 1152),
    (3, 7, 72),
    (1, 1, 1000),
    (3, 4, 2301),
    (2, 3, 13),
    (5, 1, 1),
    (1, 3, 2),
    (3, 5, 576),
    (3, 1, 1025),
    (1, 3, 4608),
    (1, 2, 8192),
]

# Tile sweeps over 9 rows (BLOCK_M 2, 4, 8 leave a partial last row tile): every (BLOCK_M,
# BLOCK_D) whose grid stays small for the interpreter, so multi-tile rows with and without a
# (masked) tail, BLOCK_D above D (clamped), and BLOCK_D = 1 all run.
SWEEP_D = [1, 3, 13, 72, 1000, 1025, 1152, 2301]
SWEEP_TILES = [(1, 1024), (2, 64), (4, 256), (8, 1), (16, 4096), (2, 512)]

# fp32: the kernel may fuse gate*y+res into one FMA (one rounding instead of two), a difference
# of about one fp32 ulp of |gate*y| (~1e-6 for O(10) products) -> atol 1e-5. bf16/fp16: one
# rounding (truncation in the interpreter) of the fp32 result, <= 1 ulp <= 2**-7 |v| (bf16),
# 2**-10 |v| (fp16); rtol allows 2 ulps.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL  # noqa: E402,F401


def make_inputs(shape, dtype, device):
    B, L, D = shape
    res = torch.randn(B, L, D).to(device, dtype)
    gate = torch.randn(B, D).to(device, dtype)
    y = (3 * torch.randn(B, L, D)).to(device, dtype)
    return res, gate, y


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, shape, dtype, atol, rtol, check_close):
    res, gate, y = make_inputs(shape, dtype, device)
    out = mk.gated_residual(res, gate, y)
    assert out.dtype == dtype and out.shape == res.shape
    expected = oracle.gated_residual(res, gate, y)
    check_close(out, expected, atol, rtol, f"{OP}[{backend}] {shape} {dtype}")


def test_tolerance_rejects_ungated_update(device, check_close):
    """Negative control: a gate of 1 everywhere (the classic missing-gate bug) is caught."""
    res, gate, y = make_inputs((2, 3, 72), torch.float32, device)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(res + y, gated_residual_ref(res, gate, y), 1e-5, 1e-5, "negative control")


def test_strided_gate(backend, device, check_close):
    """gate as a chunk of the (B, 6*D) adaLN output (row-strided view)."""
    res, _, y = make_inputs((3, 5, 72), torch.float32, device)
    gate = torch.randn(3, 6 * 72, device=device).chunk(6, dim=1)[2]
    check_close(mk.gated_residual(res, gate, y), oracle.gated_residual(res, gate, y), 1e-5, 1e-5, OP)


def test_non_contiguous_inputs_raise(device):
    res, gate, y = make_inputs((2, 5, 72), torch.float32, device)
    with pytest.raises(ValueError, match="res must be contiguous"):
        mk.gated_residual(res.transpose(0, 1).contiguous().transpose(0, 1), gate, y)
    with pytest.raises(ValueError, match="y must be contiguous"):
        mk.gated_residual(res, gate, y.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="gate must have unit stride"):
        mk.gated_residual(res, torch.randn(72, 2, device=device).t(), y)


@pytest.mark.parametrize(
    "res_shape, gate_shape, y_shape, y_dtype, error, match",
    [
        ((2, 5, 72), (2, 72), (2, 5, 71), torch.float32, ValueError, r"y must have the shape of res \(2, 5, 72\)"),
        ((2, 5, 72), (1, 72), (2, 5, 72), torch.float32, ValueError, r"gate must be \(B, D\)=\(2, 72\), got \(1, 72\)"),
        ((2, 5, 72), (2, 72), (2, 5, 72), torch.bfloat16, TypeError, "y must have the dtype of res"),
        ((10, 72), (2, 72), (10, 72), torch.float32, ValueError, "res must be 3-D"),
    ],
)
def test_bad_inputs_raise(res_shape, gate_shape, y_shape, y_dtype, error, match):
    with pytest.raises(error, match=match):
        mk.gated_residual(torch.zeros(res_shape), torch.zeros(gate_shape), torch.zeros(y_shape, dtype=y_dtype))


def _sweep_params():
    out = []
    for D in SWEEP_D:
        for block_m, block_d in SWEEP_TILES:
            width = min(block_d, 1 << (D.bit_length() - 1))  # BLOCK_D clamps to a power of two <= D
            n_programs = -(-9 // block_m) * (D // width)
            if n_programs <= 40:
                out.append(pytest.param(D, block_m, block_d, id=f"D{D}-M{block_m}-N{block_d}"))
    return out


@pytest.mark.parametrize("D, block_m, block_d", _sweep_params())
def test_tile_sweep(D, block_m, block_d, check_close):
    """Each tiling matches the reference (fp32 and bf16); on CUDA tilings also agree bitwise.

    On CPU (interpreter) tilings are only compared with the reference, within the tolerance:
    CPU float results may depend on the tiling and the machine.
    """
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2 * BF16_REL)):
        res, gate, y = make_inputs((3, 3, D), dtype, device)
        out = triton_kernels.gated_residual_triton(res, gate, y, config={"BLOCK_M": block_m, "BLOCK_D": block_d})
        check_close(out, gated_residual_ref(res.float(), gate.float(), y.float()), 1e-5, rtol,
                    f"{OP} D={D} BLOCK_M={block_m} BLOCK_D={block_d} {dtype}")
        if device.type == "cuda":  # elementwise: the tile shape cannot change a value on a GPU
            base = triton_kernels.gated_residual_triton(res, gate, y, config={"BLOCK_M": 1, "BLOCK_D": 1024})
            torch.testing.assert_close(out, base, atol=0, rtol=0)


@pytest.mark.parametrize("D, block_m, block_d", [(13, 4, 8), (1152, 4, 256), (2301, 16, 1024)])
def test_no_store_past_the_rows(D, block_m, block_d, check_close):
    """A partial last row tile (9 rows) and a (masked) tail write nothing past the output."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    res, gate, y = make_inputs((3, 3, D), torch.float32, device)
    buf = torch.full((9 * D + 4096,), -7.0, device=device)
    out = buf[:9 * D].view(3, 3, D)
    triton_kernels.gated_residual_triton(res, gate, y, out=out, config={"BLOCK_M": block_m, "BLOCK_D": block_d})
    assert bool((buf[9 * D:] == -7.0).all()), "stored past the rows"
    check_close(out, gated_residual_ref(res, gate, y), 1e-5, 1e-5, f"{OP} D={D}")


def test_in_place_and_broadcast_gate(check_close):
    """out aliasing res (the residual stream updated in place) with a row-stride-0 gate."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    res, _, y = make_inputs((3, 3, 1152), torch.float32, device)
    gate = torch.randn(1, 1152, device=device).expand(3, 1152)
    expected = gated_residual_ref(res, gate, y)
    out = triton_kernels.gated_residual_triton(res, gate, y, out=res, config={"BLOCK_M": 4, "BLOCK_D": 256})
    assert out.data_ptr() == res.data_ptr()
    check_close(res, expected, 1e-5, 1e-5, "in place")


def test_opcheck(device):
    res, gate, y = make_inputs((2, 3, 40), torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.gated_residual.default, (res, gate, y))

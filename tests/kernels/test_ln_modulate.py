"""ln_modulate: y = LN(x) * (1 + scale) + shift, every backend against reference.ln_modulate_ref."""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels.reference import ln_modulate_ref

OP = "ln_modulate"

# (B, L, D): DiT width 1152 and a pruned 576, odd/prime widths, L = 1, B = 3, a wide 8192 row.
SHAPES = [
    (2, 8, 1152),
    (3, 7, 72),
    (1, 1, 1000),
    (3, 5, 576),
    (2, 3, 13),
    (1, 2, 8192),
    (5, 1, 1),
]

# Outputs are compared with the fp32 reference of the same (dtype-exact) inputs. fp32: only the
# order of the D-term mean/variance sums differs, a few fp32 ulps of O(1) outputs -> 1e-5.
# bf16/fp16: the kernel computes in fp32 and rounds once (the interpreter truncates), so it
# is within 1 ulp of the fp32 result, and 1 ulp <= 2**-7 |v| for bf16 (2**-10 |v| for fp16);
# rtol allows 2 ulps, atol covers outputs that round to ~0.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL  # noqa: E402,F401


def make_inputs(shape, dtype, device):
    B, L, D = shape
    x = (torch.randn(B, L, D) * 2 + 0.5).to(device, dtype)
    shift = torch.randn(B, D).to(device, dtype)
    scale = (0.5 * torch.randn(B, D)).to(device, dtype)
    return x, shift, scale


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, device, shape, dtype, atol, rtol, check_close):
    x, shift, scale = make_inputs(shape, dtype, device)
    y = mk.ln_modulate(x, shift, scale, eps=1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    expected = ln_modulate_ref(x.float(), shift.float(), scale.float(), 1e-6)
    check_close(y, expected, atol, rtol, f"{OP}[{backend}] {shape} {dtype}")


def test_tolerance_rejects_missing_one_plus(device, check_close):
    """The fp32 tolerance is tight enough to catch modulating by scale instead of 1 + scale."""
    x, shift, scale = make_inputs((2, 3, 72), torch.float32, device)
    wrong = ln_modulate_ref(x, shift, scale - 1.0 + 1e-3)  # (1 + scale') differs by 1e-3
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_close(wrong, ln_modulate_ref(x, shift, scale), 1e-5, 1e-5, "negative control")


def test_mixed_dtypes_bf16_x_fp32_modulation(backend, device, check_close):
    """bf16 activations with fp32 shift/scale (a common adaLN setup): output stays bf16."""
    x, shift, scale = make_inputs((2, 4, 72), torch.bfloat16, device)
    y = mk.ln_modulate(x, shift.float(), scale.float())
    assert y.dtype == torch.bfloat16
    check_close(y, ln_modulate_ref(x.float(), shift.float(), scale.float()), 1e-5, 2 * BF16_REL, OP)


def test_strided_modulation_vectors(backend, device, check_close):
    """shift/scale as chunks of one (B, 6*D) adaLN output: row-strided views, no copy needed."""
    B, L, D = 3, 5, 72
    x = torch.randn(B, L, D, device=device)
    emb = torch.randn(B, 6 * D, device=device)
    shift, scale = emb.chunk(6, dim=1)[:2]
    assert not shift.is_contiguous()
    check_close(mk.ln_modulate(x, shift, scale), ln_modulate_ref(x, shift, scale), 1e-5, 1e-5, OP)


def test_non_contiguous_x_raises(device):
    x = torch.randn(2, 72, 5, device=device).transpose(1, 2)  # (2, 5, 72), not contiguous
    with pytest.raises(ValueError, match="x must be contiguous"):
        mk.ln_modulate(x, torch.zeros(2, 72, device=device), torch.zeros(2, 72, device=device))


@pytest.mark.parametrize(
    "x_shape, shift_shape, scale_shape, dtype, error, match",
    [
        ((2, 72), (2, 72), (2, 72), torch.float32, ValueError, "x must be 3-D"),
        ((2, 5, 72), (3, 72), (2, 72), torch.float32, ValueError, r"shift must be \(B, D\)=\(2, 72\), got \(3, 72\)"),
        ((2, 5, 72), (2, 72), (2, 71), torch.float32, ValueError, r"scale must be \(B, D\)=\(2, 72\), got \(2, 71\)"),
        ((2, 5, 72), (2, 72), (2, 72), torch.float64, TypeError, "float32, float16 or bfloat16, got torch.float64"),
        ((2, 5, 72), (2, 72), (2, 72), torch.int32, TypeError, "got torch.int32"),
    ],
)
def test_bad_inputs_raise(x_shape, shift_shape, scale_shape, dtype, error, match):
    x = torch.zeros(x_shape, dtype=dtype)
    with pytest.raises(error, match=match):
        mk.ln_modulate(x, torch.zeros(shift_shape, dtype=dtype), torch.zeros(scale_shape, dtype=dtype))


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="eps must be a positive float"):
        mk.ln_modulate(torch.zeros(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8), eps=0.0)


def test_two_configs_match_exactly(check_close):
    """One program per row and several rows per program give bitwise equal rows."""
    triton_kernels = pytest.importorskip("mosaic_kernels.triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not mk.backends(device)["triton"]["available"]:
        pytest.skip("triton backend unavailable here")
    x, shift, scale = make_inputs((3, 7, 1000), torch.float32, device)
    a = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": 1, "num_warps": 4})
    b = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": 4, "num_warps": 4})
    torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"BLOCK_M=1 vs BLOCK_M=4 differ: {m}")
    check_close(a, ln_modulate_ref(x, shift, scale), 1e-5, 1e-5, "multi-program grid")


def test_opcheck(device):
    x, shift, scale = make_inputs((2, 3, 40), torch.float32, device)
    torch.library.opcheck(torch.ops.mosaic.ln_modulate.default, (x, shift, scale, 1e-6))


def test_torch_compile_fullgraph(device, check_close):
    """The custom op traces into one graph with the surrounding torch ops (no graph break).

    On CPU the graph goes through AOTAutograd with the fake impl (``aot_eager``): CPU inductor
    codegen took ~2 min on the 2-core CI machine. On CUDA inductor compiles the full graph.
    """
    torch._dynamo.reset()
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"

    def block(x, shift, scale):
        return mk.ln_modulate(x * 2.0, shift, scale) + 1.0

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    x, shift, scale = make_inputs((2, 3, 40), torch.float32, device)
    check_close(compiled(x, shift, scale), ln_modulate_ref(x * 2.0, shift, scale) + 1.0, 1e-5, 1e-5, "compiled")


def _compiled_extension_on_cuda() -> bool:
    return torch.cuda.is_available() and mk.backends("cuda")["cuda"]["available"]


@pytest.mark.skipif(not _compiled_extension_on_cuda(), reason="needs CUDA and the compiled mosaic_C extension")
def test_opcheck_compiled_op():
    x, shift, scale = make_inputs((2, 3, 72), torch.bfloat16, "cuda")
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.mosaic_C.ln_modulate.default, (out, x, shift, scale, 1e-6))

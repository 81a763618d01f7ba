"""ln_modulate: y = LN(x) * (1 + scale) + shift, every backend against the float64 oracle.

The backend tests compare with ``oracle.ln_modulate`` (an independent float64 formulation), not
with ``reference.ln_modulate_ref``: the torch backend *is* the reference. Triton-only tests below
still use the reference, which ``test_reference.py`` checks against the oracle and diffusers.
"""

from __future__ import annotations

import pytest
import torch

import mosaic_kernels as mk
import oracle
from mosaic_kernels.reference import ln_modulate_ref

OP = "ln_modulate"

# (B, L, D): DiT width 1152 (1024 + 128 chunks) and a pruned 576, odd/prime widths, L = 1, B = 3,
# a wide 8192 row (no tail), 1025 (a tail of one column), 2301 (2048 + 256, masked tail).
SHAPES = [
    (2, 8, 1152),
    (3, 7, 72),
    (1, 1, 1000),
    (3, 5, 576),
    (2, 3, 13),
    (1, 2, 8192),
    (5, 1, 1),
    (1, 3, 2),
    (3, 1, 1025),
    (3, 2, 2301),
    (1, 3, 4608),
]

# Widths for the BLOCK_M sweeps: every kind of (main, tail) split (settings.row_blocks).
SWEEP_D = [1, 3, 13, 72, 1000, 1025, 1152, 2301, 4608, 8192]
# 9 rows: BLOCK_M 2, 4 and 8 leave a partial last row tile, 16 is one program wider than the rows.
SWEEP_BLOCK_M = [1, 2, 4, 8, 16]

# Outputs are compared with the fp32 reference of the same (dtype-exact) inputs. fp32: only the
# order of the D-term mean/variance sums differs, a few fp32 ulps of O(1) outputs -> 1e-5.
# bf16/fp16: the kernel computes in fp32 and rounds once (the interpreter truncates), so it
# is within 1 ulp of the fp32 result, and 1 ulp <= 2**-7 |v| for bf16 (2**-10 |v| for fp16);
# rtol allows 2 ulps, atol covers outputs that round to ~0.
from tolerances import BF16_REL, DTYPE_TOLS, FP16_REL  # noqa: E402,F401
from triton_backend import triton_or_skip  # noqa: E402


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
    expected = oracle.ln_modulate(x, shift, scale, 1e-6)
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
    check_close(y, oracle.ln_modulate(x, shift.float(), scale.float()), 1e-5, 2 * BF16_REL, OP)


def test_strided_modulation_vectors(backend, device, check_close):
    """shift/scale as chunks of one (B, 6*D) adaLN output: row-strided views, no copy needed."""
    B, L, D = 3, 5, 72
    x = torch.randn(B, L, D, device=device)
    emb = torch.randn(B, 6 * D, device=device)
    shift, scale = emb.chunk(6, dim=1)[:2]
    assert not shift.is_contiguous()
    check_close(mk.ln_modulate(x, shift, scale), oracle.ln_modulate(x, shift, scale), 1e-5, 1e-5, OP)


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
    with pytest.raises(ValueError, match="eps must be a positive finite float, got 0.0"):
        mk.ln_modulate(torch.zeros(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8), eps=0.0)


@pytest.mark.parametrize("D", SWEEP_D)
def test_block_m_sweep_fp32(D, check_close):
    """Every BLOCK_M (dividing the 9 rows or not) matches the reference for every chunk split.

    Configs are not compared with each other bitwise: a row's reduction order may depend on the
    tiling (and CPU float results on the machine); each must be within the fp32 tolerance.
    """
    triton_kernels, device = triton_or_skip()
    x, shift, scale = make_inputs((3, 3, D), torch.float32, device)
    expected = ln_modulate_ref(x, shift, scale, 1e-6)
    for block_m in SWEEP_BLOCK_M:
        y = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": block_m, "num_warps": 4})
        check_close(y, expected, 1e-5, 1e-5, f"{OP} D={D} BLOCK_M={block_m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS[1:])
@pytest.mark.parametrize("D", [1025, 1152, 2301])
def test_block_m_sweep_half(D, dtype, atol, rtol, check_close):
    triton_kernels, device = triton_or_skip()
    x, shift, scale = make_inputs((3, 3, D), dtype, device)
    expected = ln_modulate_ref(x.float(), shift.float(), scale.float(), 1e-6)
    for block_m in (2, 16):
        y = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": block_m})
        check_close(y, expected, atol, rtol, f"{OP} D={D} {dtype} BLOCK_M={block_m}")


@pytest.mark.parametrize("D", [13, 1152, 2301])
def test_no_store_past_the_rows(D, check_close):
    """A partial last row tile (9 rows, BLOCK_M 4 and 16) and a masked tail write nothing past the
    output: ``out`` is the head of a larger buffer whose rest must keep its sentinel."""
    triton_kernels, device = triton_or_skip()
    x, shift, scale = make_inputs((3, 3, D), torch.float32, device)
    for block_m in (4, 16):
        buf = torch.full((9 * D + 4096,), -7.0, device=device)
        out = buf[:9 * D].view(3, 3, D)
        triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, out=out, config={"BLOCK_M": block_m})
        assert bool((buf[9 * D:] == -7.0).all()), f"BLOCK_M={block_m}: stored past the rows"
        check_close(out, ln_modulate_ref(x, shift, scale, 1e-6), 1e-5, 1e-5, f"{OP} D={D} BLOCK_M={block_m}")


def test_tail_statistics_matter(check_close):
    """Rows whose tail columns differ from their main columns: a norm that drops the tail from the
    mean or the variance is far off (D = 1152: the tail is 128 of the 1152 columns)."""
    triton_kernels, device = triton_or_skip()
    B, L, D = 1, 3, 1152
    x = torch.randn(B, L, D, device=device)
    x[..., 1024:] = 4.0 + 3.0 * x[..., 1024:]  # the tail has another mean and spread
    shift, scale = torch.zeros(B, D, device=device), torch.zeros(B, D, device=device)
    y = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": 2})
    check_close(y, ln_modulate_ref(x, shift, scale, 1e-6), 1e-5, 1e-5, "tail statistics")


def test_broadcast_modulation_vectors(check_close):
    """(1, D) shift/scale expanded to (B, D) (row stride 0) and a 2-D adaLN chunk of odd stride."""
    triton_kernels, device = triton_or_skip()
    B, L, D = 3, 2, 72
    x = torch.randn(B, L, D, device=device)
    shift = torch.randn(1, D, device=device).expand(B, D)
    scale = torch.randn(B, 2 * D + 1, device=device)[:, 1:D + 1]  # row stride 145, offset 1
    y = triton_kernels.ln_modulate_triton(x, shift, scale, 1e-6, config={"BLOCK_M": 4})
    check_close(y, ln_modulate_ref(x, shift, scale, 1e-6), 1e-5, 1e-5, "broadcast vectors")


def test_row_alignment_hint():
    """ALIGN (a promise to the compiler) divides D and every stride; 0 strides do not limit it."""
    common = pytest.importorskip("mosaic_kernels.triton._common")
    assert common.row_alignment(1152, 6912, 6912) == 16
    assert common.row_alignment(72, 432) == 8
    assert common.row_alignment(1000, 1000) == 8
    assert common.row_alignment(2301, 2301) == 1
    assert common.row_alignment(72, 0, 145) == 1
    assert common.row_alignment(64, 0) == 16
    for D in range(1, 300):
        for stride in (0, D, 6 * D, D + 1):
            a = common.row_alignment(D, stride)
            assert a in (1, 2, 4, 8, 16) and D % a == 0 and stride % a == 0
            assert a == 16 or D % (2 * a) or stride % (2 * a), (D, stride, a)  # the largest such


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
    check_close(compiled(x, shift, scale), oracle.ln_modulate(x * 2.0, shift, scale) + 1.0, 1e-5, 1e-5, "compiled")


def _compiled_extension_on_cuda() -> bool:
    return torch.cuda.is_available() and mk.backends("cuda")["cuda"]["available"]


@pytest.mark.skipif(not _compiled_extension_on_cuda(), reason="needs CUDA and the compiled mosaic_C extension")
def test_opcheck_compiled_op():
    x, shift, scale = make_inputs((2, 3, 72), torch.bfloat16, "cuda")
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.mosaic_C.ln_modulate.default, (out, x, shift, scale, 1e-6))


def test_row_settings_from_width_and_dtype():
    """Settings are a function of (op, D, dtype): whole rows as main + tail chunks (1152 -> 1024 +
    128), power-of-two rows per program, unsupported dtypes and over-wide rows refused."""
    settings = pytest.importorskip("mosaic_kernels.triton.settings")
    from mosaic_kernels.triton import INTERPRETED

    for op in settings.NORM_OPS:
        cfg = settings.row_settings(op, 1152, torch.bfloat16)
        assert (cfg["BLOCK_D"], cfg["TAIL_D"]) == (1024, 128)
        assert cfg == settings.row_settings(op, 1152, torch.float32)  # fp32 in registers either way
        for D in (1, 72, 1000, 2301, 8192, settings.MAX_FUSED_D):
            cfg = settings.row_settings(op, D, torch.float32)
            lanes = cfg["BLOCK_D"] + cfg["TAIL_D"]
            assert D <= lanes < 2 * D or D == 1
            assert cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1) == 0 and cfg["num_warps"] in (4, 8, 16, 32)
            if not INTERPRETED:
                assert cfg["BLOCK_M"] * lanes <= max(2048, lanes) and cfg["BLOCK_M"] <= 16
    cfg = settings.row_settings("gated_residual", 1152, torch.float16)
    assert cfg["BLOCK_D"] + cfg["TAIL_D"] == 1152 or (cfg["BLOCK_D"], cfg["TAIL_D"]) == (1024, 128)
    with pytest.raises(TypeError, match="unsupported dtype"):
        settings.row_settings("ln_modulate", 72, torch.float64)
    with pytest.raises(NotImplementedError, match="exceeds the single-pass row limit"):
        settings.row_settings("ln_modulate", settings.MAX_FUSED_D + 1, torch.float32)
    with pytest.raises(ValueError, match="unknown row op"):
        settings.row_settings("softmax", 72, torch.float32)
    assert settings.fit_row_config("ln_modulate", 72, {"BLOCK_M": 2, "BLOCK_D": 4096}) == \
        {"BLOCK_M": 2, "BLOCK_D": 64, "TAIL_D": 8, "num_warps": 4}
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        settings.fit_row_config("ln_modulate", 72, {"BLOCK_M": 3})

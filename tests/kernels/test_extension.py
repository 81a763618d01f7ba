"""The compiled extension mosaic_kernels._C: loading, version checks, registered ops, CUDA results.

Runs everywhere: the loader (with a faked build info, no rebuild) and, when ``_C`` was built,
its op schemas and that the Python custom op carries the one fake. The argument checks and the
CUDA results of ``torch.ops.mosaic_C.*`` against ``mosaic_kernels.reference`` need a GPU and
skip without one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.library import opcheck

from mosaic_kernels import _ext
from mosaic_kernels.reference import gated_residual_ln_modulate_ref, ln_modulate_ref

EXT, EXT_REASON = _ext.load_extension()
HAS_CUDA = torch.cuda.is_available()

needs_ext = pytest.mark.skipif(EXT is None, reason=f"mosaic_kernels._C: {EXT_REASON}")
needs_cuda = pytest.mark.skipif(
    EXT is None or not HAS_CUDA,
    reason=f"mosaic_kernels._C: {EXT_REASON}" if EXT is None else "needs a CUDA device",
)

EPS = 1e-6

# (name, type, written) per argument: the schemas of COMMON.md.
SCHEMAS = {
    "ln_modulate": [
        ("out", "Tensor", True), ("x", "Tensor", False), ("shift", "Tensor", False),
        ("scale", "Tensor", False), ("eps", "float", False),
    ],
    "gated_residual_ln_modulate": [
        ("h_out", "Tensor", True), ("out", "Tensor", True), ("res", "Tensor", False),
        ("gate", "Tensor", False), ("y", "Tensor", False), ("shift", "Tensor", False),
        ("scale", "Tensor", False), ("eps", "float", False),
    ],
}


# ---------------------------------------------------------------------------------------------
# Loader (no compiled module needed: the module lookup and the build info are faked)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    """load_extension() with an empty cache, a present module and an import that must not run."""
    _ext.load_extension.cache_clear()
    monkeypatch.setattr(_ext, "_extension_spec", lambda: object())

    def forbidden_import():
        raise AssertionError("the .so must not be imported when its build info does not match")

    monkeypatch.setattr(_ext, "_import_extension", forbidden_import)
    yield monkeypatch
    _ext.load_extension.cache_clear()


def test_load_extension_returns_module_or_reason_and_is_cached():
    result = _ext.load_extension()
    assert result is _ext.load_extension(), "load_extension() must be cached"
    module, message = result
    assert isinstance(message, str) and message
    if module is None:
        assert EXT is None
    else:
        assert hasattr(torch.ops.mosaic_C, "ln_modulate"), "importing _C must register the ops"


def test_torch_mismatch_disables_extension_with_one_warning(fresh_loader):
    fake = {"torch_version": "2.0.1+cu118", "cuda_version": "11.8", "cuda_arch_list": ["8.0"]}
    fresh_loader.setattr(_ext, "read_build_info", lambda: fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _ext.load_extension()
        second = _ext.load_extension()
    module, message = first
    assert second is first
    assert module is None
    assert "2.0.1+cu118" in message and torch.__version__ in message, message
    assert "--no-build-isolation" in message, message
    mismatches = [w for w in caught if issubclass(w.category, _ext.ExtensionMismatchWarning)]
    assert len(mismatches) == 1, [str(w.message) for w in caught]
    assert str(mismatches[0].message) == message


def test_cuda_mismatch_with_same_torch_disables_extension(fresh_loader):
    fake = {"torch_version": torch.__version__, "cuda_version": "9.9"}
    fresh_loader.setattr(_ext, "read_build_info", lambda: fake)
    with pytest.warns(_ext.ExtensionMismatchWarning):
        module, message = _ext.load_extension()
    assert module is None
    assert "CUDA 9.9" in message and f"CUDA {torch.version.cuda}" in message, message


def test_absent_module_is_not_built(fresh_loader):
    fresh_loader.setattr(_ext, "_extension_spec", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing build is not worth a warning
        module, message = _ext.load_extension()
    assert module is None
    assert message.startswith("not built ("), message


def test_missing_build_info_refuses_to_import(fresh_loader):
    fresh_loader.setattr(_ext, "read_build_info", lambda: None)
    module, message = _ext.load_extension()
    assert module is None
    assert "_build_info.json" in message and "--no-build-isolation" in message, message


def test_matching_build_info_imports_module(fresh_loader):
    sentinel = object()
    fresh_loader.setattr(_ext, "read_build_info", lambda: {**_ext.installed_versions(),
                                                           "cuda_arch_list": ["8.0", "9.0"]})
    fresh_loader.setattr(_ext, "_import_extension", lambda: sentinel)
    module, message = _ext.load_extension()
    assert module is sentinel
    assert message.startswith("loaded") and "8.0,9.0" in message, message


def test_import_failure_is_a_reason_not_an_exception(fresh_loader):
    def broken_import():
        raise ImportError("undefined symbol: _ZN3c104cuda9SomethingEv")

    fresh_loader.setattr(_ext, "read_build_info", _ext.installed_versions)
    fresh_loader.setattr(_ext, "_import_extension", broken_import)
    module, message = _ext.load_extension()
    assert module is None
    assert "undefined symbol" in message and "--no-build-isolation" in message, message


def test_read_build_info_rejects_non_object(tmp_path):
    path = tmp_path / "_build_info.json"
    assert _ext.read_build_info(path) is None
    path.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="JSON object"):
        _ext.read_build_info(path)
    path.write_text('{"torch_version": "2.14.1+cu130", "cuda_version": "13.0"}')
    assert _ext.read_build_info(path)["cuda_version"] == "13.0"


@needs_ext
def test_real_build_info_matches_installed_torch():
    info = _ext.read_build_info()
    assert info is not None
    assert _ext.build_mismatch(info, _ext.installed_versions()) is None
    assert info["cuda_arch_list"], info


# ---------------------------------------------------------------------------------------------
# Registered ops: schemas, one fake per op, argument checks
# ---------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_schema(name):
    schema = getattr(torch.ops.mosaic_C, name).default._schema
    got = [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    assert got == SCHEMAS[name], str(schema)
    assert len(schema.returns) == 0, str(schema)


def _ln_args(B=2, L=3, D=40, dtype=torch.float32, device="cuda"):
    x = torch.randn(B, L, D, device=device).to(dtype)
    cond = torch.randn(B, D, device=device).to(dtype)
    return torch.empty_like(x), x, cond, cond.clone(), EPS


def _gated_args(B=2, L=3, D=40, dtype=torch.float32, device="cuda"):
    res = torch.randn(B, L, D, device=device).to(dtype)
    cond = torch.randn(B, D, device=device).to(dtype)
    return (torch.empty_like(res), torch.empty_like(res), res, cond, torch.randn_like(res),
            cond.clone(), cond.clone(), EPS)


@needs_ext
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_one_fake_per_op_the_python_custom_op(name):
    """torch.compile traces mosaic::<op> (the Python custom op and its register_fake); the
    compiled mosaic_C::<op> runs inside its body and has no Meta kernel of its own."""
    make = _ln_args if name == "ln_modulate" else _gated_args
    args = make(device="meta")
    with pytest.raises(NotImplementedError, match="no fake impl or Meta kernel"):
        getattr(torch.ops.mosaic_C, name)(*args)
    inputs = args[1:] if name == "ln_modulate" else args[2:]
    outs = getattr(torch.ops.mosaic, name)(*inputs)
    for out in outs if isinstance(outs, tuple) else (outs,):
        assert out.device.type == "meta" and out.shape == inputs[0].shape


@needs_cuda
def test_kernels_accept_valid_arguments():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.ops.mosaic_C.ln_modulate(*_ln_args(dtype=dtype))
        torch.ops.mosaic_C.gated_residual_ln_modulate(*_gated_args(dtype=dtype))


@needs_cuda
@pytest.mark.parametrize("case, match", [
    ("shift_shape", r"ln_modulate: shift must have shape \[2, 40\], got \[2, 39\]"),
    ("x_2d", r"ln_modulate: x must be 3-D \(B, L, D\), got shape \[6, 40\]"),
    ("scale_dtype", r"ln_modulate: scale must have the dtype of x \(Float\), got Half"),
    ("out_strided", r"ln_modulate: out must be contiguous, got strides"),
    ("x_int", r"ln_modulate: x must be float32, float16 or bfloat16, got Int"),
    ("eps_negative", r"ln_modulate: eps must be >= 0, got -1"),
    ("empty_hidden", r"ln_modulate: hidden size D must be in \[1, "),
])
def test_ln_modulate_rejects_bad_arguments(case, match):
    """The last guard: the C++ checks, which the Python op's validation normally pre-empts."""
    out, x, shift, scale, eps = _ln_args()
    if case == "shift_shape":
        shift = torch.empty(2, 39, device="cuda")
    elif case == "x_2d":
        x = torch.empty(6, 40, device="cuda")
    elif case == "scale_dtype":
        scale = scale.half()
    elif case == "out_strided":
        out = torch.empty(2, 40, 3, device="cuda").transpose(1, 2)
    elif case == "x_int":
        x = torch.empty(2, 3, 40, device="cuda", dtype=torch.int32)
    elif case == "eps_negative":
        eps = -1.0
    elif case == "empty_hidden":
        x, out = torch.empty(2, 3, 0, device="cuda"), torch.empty(2, 3, 0, device="cuda")
        shift, scale = torch.empty(2, 0, device="cuda"), torch.empty(2, 0, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mosaic_C.ln_modulate(out, x, shift, scale, eps)


@needs_cuda
@pytest.mark.parametrize("case, match", [
    ("gate_shape", r"gated_residual_ln_modulate: gate must have shape \[2, 40\], got \[1, 40\]"),
    ("y_dtype", r"gated_residual_ln_modulate: y must have the dtype of res \(BFloat16\), got Float"),
    ("h_out_shape", r"gated_residual_ln_modulate: h_out must have shape \[2, 3, 40\], got \[2, 4, 40\]"),
])
def test_gated_residual_ln_modulate_rejects_bad_arguments(case, match):
    h_out, out, res, gate, y, shift, scale, eps = _gated_args(dtype=torch.bfloat16)
    if case == "gate_shape":
        gate = torch.empty(1, 40, device="cuda", dtype=torch.bfloat16)
    elif case == "y_dtype":
        y = y.float()
    elif case == "h_out_shape":
        h_out = torch.empty(2, 4, 40, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mosaic_C.gated_residual_ln_modulate(h_out, out, res, gate, y, shift, scale, eps)


@needs_ext
def test_cpu_tensors_have_no_kernel():
    x = torch.randn(2, 3, 8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.mosaic_C.ln_modulate(torch.empty_like(x), x, torch.randn(2, 8), torch.randn(2, 8), EPS)


# ---------------------------------------------------------------------------------------------
# CUDA results against mosaic_kernels.reference
# ---------------------------------------------------------------------------------------------

# (B, L, D). 1152: DiT-XL; 576/2304: pruned widths; 4608: DiT MLP width; 2301 and 13: no 16-byte
# vector path (generic kernel); 10000: wider than the shared-memory row cache (8192 floats),
# re-read from global memory; (5, 1, 1): a single element per row.
SHAPES = [(2, 256, 1152), (3, 7, 576), (1, 5, 2304), (2, 3, 4608), (3, 5, 2301), (2, 3, 13),
          (1, 2, 10000), (5, 1, 1)]

# Compared with the fp32 reference on the same (dtype-exact) inputs. fp32: only the order of the
# D-term sums and rsqrtf (2 ulp) differ -> 1e-5. fp16/bf16: the kernel computes in fp32 and rounds
# once to nearest, so it is within 1 ulp of the rounded reference: 1 ulp <= 2**-7 |v| (bf16),
# 2**-10 |v| (fp16); rtol allows 2 ulps, atol covers outputs that round to ~0.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 2 * 2.0**-10, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 2 * 2.0**-7, id="bf16"),
]


def _ln_inputs(shape, dtype, offset=0.5, misalign=False):
    B, L, D = shape
    x = torch.randn(B, L, D) * 2 + offset
    if misalign:  # contiguous but 4 bytes past a 16-byte boundary: forces the generic kernel
        buf = torch.empty(B * L * D + 1, dtype=dtype, device="cuda")
        x = buf[1:].view(B, L, D).copy_(x)
    else:
        x = x.to("cuda", dtype)
    shift = torch.randn(B, D).to("cuda", dtype)
    scale = (0.5 * torch.randn(B, D)).to("cuda", dtype)
    return x, shift, scale


@needs_cuda
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate_matches_reference(shape, dtype, atol, rtol, check_close):
    x, shift, scale = _ln_inputs(shape, dtype)
    out = torch.full_like(x, float("nan"))
    torch.ops.mosaic_C.ln_modulate(out, x, shift, scale, EPS)
    expected = ln_modulate_ref(x.float(), shift.float(), scale.float(), EPS)
    check_close(out, expected, atol, rtol, f"mosaic_C.ln_modulate {shape} {dtype}")


@needs_cuda
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
def test_ln_modulate_misaligned_input_uses_generic_path(dtype, atol, rtol, check_close):
    x, shift, scale = _ln_inputs((2, 16, 1152), dtype, misalign=True)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    out = torch.empty_like(x)
    torch.ops.mosaic_C.ln_modulate(out, x, shift, scale, EPS)
    expected = ln_modulate_ref(x.float(), shift.float(), scale.float(), EPS)
    check_close(out, expected, atol, rtol, f"mosaic_C.ln_modulate misaligned {dtype}")


@needs_cuda
def test_ln_modulate_large_mean_is_numerically_sound(check_close):
    """Rows with mean 1e3 and unit variance: E[x^2] - E[x]^2 in fp32 would lose all digits."""
    x, shift, scale = _ln_inputs((2, 64, 1152), torch.float32, offset=1000.0)
    out = torch.empty_like(x)
    torch.ops.mosaic_C.ln_modulate(out, x, shift, scale, EPS)
    # Ground truth in float64 (ln_modulate_ref computes in fp32).
    xd = x.double()
    xc = xd - xd.mean(dim=-1, keepdim=True)
    normed = xc / torch.sqrt((xc * xc).mean(dim=-1, keepdim=True) + EPS)
    expected = normed * (1 + scale.double()[:, None, :]) + shift.double()[:, None, :]
    # fp32 inputs near 1e3 carry ~6e-5 absolute rounding: the mean and the deviations are
    # accurate to ~1e-4 of a unit-variance row.
    check_close(out, expected, 1e-3, 1e-4, "mosaic_C.ln_modulate mean 1e3")


@needs_cuda
@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual_ln_modulate_matches_reference(shape, dtype, atol, rtol, check_close):
    B, L, D = shape
    res, shift, scale = _ln_inputs(shape, dtype)
    y = torch.randn(B, L, D).to("cuda", dtype)
    gate = torch.randn(B, D).to("cuda", dtype)
    h_out = torch.full_like(res, float("nan"))
    out = torch.full_like(res, float("nan"))
    torch.ops.mosaic_C.gated_residual_ln_modulate(h_out, out, res, gate, y, shift, scale, EPS)
    h_ref, out_ref = gated_residual_ln_modulate_ref(res.float(), gate.float(), y.float(),
                                                    shift.float(), scale.float(), EPS)
    what = f"mosaic_C.gated_residual_ln_modulate {shape} {dtype}"
    check_close(h_out, h_ref, atol, rtol, f"{what} h")
    check_close(out, out_ref, atol, rtol, f"{what} out")


@needs_cuda
def test_cuda_kernels_reject_cpu_and_mixed_devices():
    x, shift, scale = _ln_inputs((2, 3, 64), torch.float32)
    with pytest.raises(RuntimeError, match="shift must be on the device of x"):
        torch.ops.mosaic_C.ln_modulate(torch.empty_like(x), x, shift.cpu(), scale, EPS)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.mosaic_C.ln_modulate(torch.empty_like(x), x, shift, scale.t().contiguous().t(), EPS)


@needs_cuda
def test_cuda_kernels_reject_aliased_output():
    x, shift, scale = _ln_inputs((2, 3, 64), torch.float32)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.mosaic_C.ln_modulate(x, x, shift, scale, EPS)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype):
    """Schema checks (the mutation annotations) of the internal ops; their fake-tensor checks
    belong to the Python custom ops that call them (opcheck in the per-op tests)."""
    x, shift, scale = _ln_inputs((2, 5, 1152), dtype)
    opcheck(torch.ops.mosaic_C.ln_modulate.default, (torch.empty_like(x), x, shift, scale, EPS),
            test_utils=("test_schema",))
    y = torch.randn_like(x)
    opcheck(torch.ops.mosaic_C.gated_residual_ln_modulate.default,
            (torch.empty_like(x), torch.empty_like(x), x, scale.clone(), y, shift, scale, EPS),
            test_utils=("test_schema",))

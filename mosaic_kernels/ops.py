"""Public kernel ops and their backend dispatch (forward-only).

Every op except ``attention`` is a ``torch.library`` custom op ``mosaic::<op>`` with a fake
(meta) implementation computed from shapes alone, so ``torch.compile(fullgraph=True)`` traces
through it without a graph break. The public function validates its inputs (clear
``ValueError`` / ``TypeError``), then calls ``torch.ops.mosaic.<op>``, whose body picks one
backend per call:

1. ``cuda``: the compiled extension ``torch.ops.mosaic_C.<op>`` (destination-passing), when it
   is loaded and the inputs are CUDA tensors. Only ``ln_modulate`` and
   ``gated_residual_ln_modulate`` have one.
2. ``triton``: the Triton kernel in ``mosaic_kernels/triton/<op>.py``, for CUDA tensors, or CPU
   tensors when ``TRITON_INTERPRET=1`` was set before the kernels were imported (tests).
3. ``torch``: the plain definitions in :mod:`mosaic_kernels.reference`.

A skipped backend is logged once per (op, backend, reason). The GEMM ops (``linear_gelu``,
``linear_gated_residual``) choose in ``auto`` mode between the ``vendor`` path (cuBLAS(Lt)
through torch, the default: a plain tiled Triton GEMM loses to it on H100) and the Triton GEMM,
per shape, from :mod:`mosaic_kernels.configs`.

Pinning: ``MOSAIC_KERNELS_BACKEND=auto|cuda|triton|torch`` (read at every call), or the
:func:`use_backend` context manager, which takes precedence. A pinned backend that the op
implements but cannot run on these inputs raises ``RuntimeError`` naming the reason: a pin is
never silently replaced. An op that does not implement the pinned backend at all (``cuda`` for
the ops without a compiled kernel) follows the ``auto`` order, logged once.

All ops are forward-only: calling ``backward`` through them raises.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import math
import numbers
import operator
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import configs
from . import reference as ref

logger = logging.getLogger(__name__)

__all__ = [
    "BACKEND_ENV",
    "attention",
    "backends",
    "current_backend",
    "gated_residual",
    "gated_residual_ln_modulate",
    "linear_gated_residual",
    "linear_gelu",
    "ln_modulate",
    "record_dispatch",
    "select_backend",
    "use_backend",
]

BACKEND_ENV = "MOSAIC_KERNELS_BACKEND"
_BACKEND_NAMES = ("auto", "cuda", "triton", "torch")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Ops with a compiled kernel in torch.ops.mosaic_C.
_CUDA_OPS = frozenset({"ln_modulate", "gated_residual_ln_modulate"})

_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("mosaic_backend", default=None)
_dispatch_log: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "mosaic_dispatch_log", default=None)
_logged: set[tuple[str, ...]] = set()


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------


def _log_once(key: tuple[str, ...], level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def _check_backend_name(name: str, source: str) -> str:
    if name not in _BACKEND_NAMES:
        raise ValueError(f"{source}: expected one of {_BACKEND_NAMES}, got {name!r}")
    return name


def current_backend() -> str:
    """The pinned backend: the innermost :func:`use_backend`, else ``$MOSAIC_KERNELS_BACKEND``.

    Returns:
        One of ``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``.

    Raises:
        ValueError: if the environment variable holds another value.
    """
    pinned = _pinned.get()
    if pinned is not None:
        return pinned
    env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    return _check_backend_name(env, BACKEND_ENV)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Pin the backend of every mosaic op called inside the ``with`` block (this thread/task).

    Args:
        name: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: for another name.

    Examples:
        >>> import torch, mosaic_kernels as mk
        >>> with mk.use_backend("torch"):
        ...     y = mk.ln_modulate(torch.randn(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8))
    """
    token = _pinned.set(_check_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _pinned.reset(token)


@contextlib.contextmanager
def record_dispatch() -> Iterator[collections.Counter]:
    """Count which backend ran each op call inside the ``with`` block (this thread/task).

    Yields a ``Counter`` of ``(op, backend)``; GEMM ops report ``"vendor"`` for cuBLAS(Lt),
    ``attention`` its SDPA backend. Calls traced into a CUDA graph are counted once, at capture.

    Examples:
        >>> import torch, mosaic_kernels as mk
        >>> with mk.ops.record_dispatch() as calls:
        ...     _ = mk.ln_modulate(torch.randn(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8))
        >>> sorted(calls)
        [('ln_modulate', 'torch')]
    """
    counter: collections.Counter = collections.Counter()
    token = _dispatch_log.set(counter)
    try:
        yield counter
    finally:
        _dispatch_log.reset(token)


def _dispatched(op: str, backend: str) -> str:
    log = _dispatch_log.get()
    if log is not None:
        log[(op, backend)] += 1
    return backend


@functools.lru_cache(maxsize=1)
def _cuda_extension() -> tuple[Any, str]:
    """(module, "") when the compiled extension loaded, else (None, reason). Cached."""
    try:
        from ._ext import load_extension  # owned by the extension build; may not exist yet
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        return None, f"mosaic_kernels._ext is not importable ({exc})"
    try:
        module, reason = load_extension()
    except Exception as exc:  # noqa: BLE001 - load_extension must not raise; be defensive
        return None, f"load_extension() raised {type(exc).__name__}: {exc}"
    if module is None:
        return None, reason or "compiled extension not built"
    return module, ""


@functools.lru_cache(maxsize=1)
def _triton_package() -> tuple[Any, str]:
    """(mosaic_kernels.triton, "") when Triton and the kernels import, else (None, reason)."""
    try:
        from . import triton as triton_kernels
    except ImportError as exc:
        return None, f"triton is not importable ({exc})"
    return triton_kernels, ""


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    module, reason = _cuda_extension()
    if module is None:
        return False, reason
    if device.type != "cuda":
        return False, f"inputs are on {device}, the compiled kernels need CUDA tensors"
    return True, ""


def _triton_status(device: torch.device) -> tuple[bool, str]:
    package, reason = _triton_package()
    if package is None:
        return False, reason
    if device.type == "cuda":
        if package.INTERPRETED:
            return False, "the Triton kernels were built for the interpreter (TRITON_INTERPRET=1): CPU tensors only"
        return True, ""
    if device.type == "cpu":
        if package.INTERPRETED:
            return True, ""
        return False, (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
            "mosaic_kernels.triton is first imported"
        )
    return False, f"no Triton backend for device type {device.type!r}"


def _cuda_inputs_status(op: str, main: torch.Tensor, *others: torch.Tensor) -> tuple[bool, str]:
    """Whether the compiled kernel takes these inputs: it is compiled for one dtype per call."""
    dtypes = {t.dtype for t in (main, *others)}
    if len(dtypes) > 1:
        return False, f"the compiled {op} needs one dtype for all inputs, got {sorted(map(str, dtypes))}"
    return True, ""


def select_backend(op: str, device: torch.device | str, cuda_inputs: tuple[bool, str] = (True, "")) -> str:
    """The backend ``op`` runs on for inputs on ``device`` under the current pin.

    Args:
        op: an op name, e.g. ``"ln_modulate"``.
        device: the inputs' device.
        cuda_inputs: ``(ok, reason)``: whether the compiled kernel accepts these inputs.

    Returns:
        ``"cuda"``, ``"triton"`` or ``"torch"``.

    Raises:
        RuntimeError: if a backend is pinned that ``op`` implements but cannot run here.
    """
    device = torch.device(device)
    pin = current_backend()
    if pin == "torch":
        return "torch"
    if pin == "cuda" and op not in _CUDA_OPS:
        _log_once(("nocuda", op), logging.INFO,
                  "%s has no compiled CUDA kernel; %s=cuda falls back to the auto order", op, BACKEND_ENV)
        pin = "auto"
    if pin in ("cuda", "triton"):
        ok, reason = (_cuda_status if pin == "cuda" else _triton_status)(device)
        if ok and pin == "cuda":
            ok, reason = cuda_inputs
        if not ok:
            raise RuntimeError(f"{op}: backend {pin!r} is pinned but unavailable: {reason}")
        return pin
    # auto
    if op in _CUDA_OPS:
        ok, reason = _cuda_status(device)
        if ok:
            ok, reason = cuda_inputs
        if ok:
            return "cuda"
        _log_once(("skip", op, "cuda", reason), logging.INFO, "%s: skipping cuda backend: %s", op, reason)
    ok, reason = _triton_status(device)
    if ok:
        return "triton"
    _log_once(("skip", op, "triton", reason), logging.INFO, "%s: skipping triton backend: %s", op, reason)
    return "torch"


def backends(device: torch.device | str | None = None) -> dict[str, dict[str, Any]]:
    """Which backends can run, and why not.

    Args:
        device: the device to ask about; default CUDA when available, else CPU.

    Returns:
        ``{"cuda": {"available": bool, "reason": str}, "triton": {...}, "torch": {...}}``; the
        reason is empty when available. ``"pinned"`` holds the current pin.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    result: dict[str, Any] = {}
    for name, status in (("cuda", _cuda_status), ("triton", _triton_status)):
        ok, reason = status(device)
        result[name] = {"available": ok, "reason": reason}
    result["torch"] = {"available": True, "reason": ""}
    result["pinned"] = current_backend()
    return result


# ---------------------------------------------------------------------------------------------
# Input validation (public functions)
# ---------------------------------------------------------------------------------------------


def _check_tensor(op: str, name: str, t: Any, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}; "
            f"call .contiguous() first"
        )


def _check_vector(op: str, name: str, t: torch.Tensor, B: int, D: int, what: str = "(B, D)") -> None:
    if tuple(t.shape) != (B, D):
        raise ValueError(f"{op}: {name} must be {what}=({B}, {D}), got {tuple(t.shape)}")
    if D > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride in its last dim, got strides {t.stride()}")


def _check_same(op: str, what: str, tensors: dict[str, torch.Tensor], attr: str) -> None:
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        raise ValueError(f"{op}: {what} must match, got " + ", ".join(f"{k}={v}" for k, v in values.items()))


def _check_eps(op: str, eps: Any) -> None:
    """eps: a real number (Python or NumPy; not a bool or a tensor), finite and > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a positive finite float, got {eps!r} ({type(eps).__name__})")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive finite float, got {eps!r}")


def _check_ln_inputs(op: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: Any,
                     x_name: str = "x") -> None:
    _check_tensor(op, x_name, x, 3)
    _check_tensor(op, "shift", shift, 2)
    _check_tensor(op, "scale", scale, 2)
    B, _, D = x.shape
    _check_vector(op, "shift", shift, B, D)
    _check_vector(op, "scale", scale, B, D)
    _check_eps(op, eps)


def _check_gated_inputs(op: str, res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    _check_tensor(op, "res", res, 3)
    _check_tensor(op, "gate", gate, 2)
    _check_tensor(op, "y", y, 3)
    if y.shape != res.shape:
        raise ValueError(f"{op}: y must have the shape of res {tuple(res.shape)}, got {tuple(y.shape)}")
    if y.dtype != res.dtype:
        raise TypeError(f"{op}: y must have the dtype of res ({res.dtype}), got {y.dtype}")
    _check_contiguous(op, "res", res)
    _check_contiguous(op, "y", y)
    B, _, D = res.shape
    _check_vector(op, "gate", gate, B, D)


def _check_linear_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         x_ndim: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x_ndim is None and x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., K), got shape {tuple(x.shape)}")
    _check_tensor(op, "x", x, x_ndim if x_ndim is not None else x.dim())
    _check_tensor(op, "weight", weight, 2)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x's last dim must equal weight.shape[1]={K}, got x shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    _check_contiguous(op, "x", x)
    if weight.stride(1) != 1 and weight.stride(0) != 1:
        raise ValueError(f"{op}: weight must be contiguous in one dim, got strides {weight.stride()}")
    if bias is not None:
        _check_tensor(op, "bias", bias, 1)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must be (N,)=({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have the dtype of x ({x.dtype}), got {bias.dtype}")


# ---------------------------------------------------------------------------------------------
# ln_modulate
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic::ln_modulate", mutates_args=())
def _ln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    backend = _dispatched("ln_modulate", select_backend(
        "ln_modulate", x.device, _cuda_inputs_status("ln_modulate", x, shift, scale)))
    if backend == "cuda":
        out = torch.empty_like(x)
        torch.ops.mosaic_C.ln_modulate(out, x, shift.contiguous(), scale.contiguous(), eps)
        return out
    if backend == "triton":
        return _triton_package()[0].ln_modulate_triton(x, shift, scale, eps)
    return ref.ln_modulate_ref(x, shift, scale, eps)


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = LN(x) * (1 + scale[:, None, :]) + shift[:, None, :]`` (LayerNorm without affine). Forward-only.

    Args:
        x: (B, L, D) contiguous activations, float32/float16/bfloat16.
        shift: (B, D) per-sample shift (any of those dtypes; unit stride in the last dim).
        scale: (B, D) per-sample scale.
        eps: variance epsilon: a finite real number > 0 (Python or NumPy scalar, not a bool).

    Returns:
        (B, L, D) tensor of ``x.dtype``. Empty inputs (B, L or D = 0) give an empty output.
        NaN/inf in a row of ``x`` make that output row NaN; in ``shift``/``scale``, that column
        (as the reference).

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or an ``eps`` that is not a number.
        ValueError: for wrong ranks, mismatched B or D, a non-contiguous ``x``, or an ``eps``
            that is not finite and > 0.
        RuntimeError: if a pinned backend cannot run (see :func:`use_backend`).
    """
    _check_ln_inputs("ln_modulate", x, shift, scale, eps)
    _check_contiguous("ln_modulate", "x", x)
    _check_same("ln_modulate", "devices", {"x": x, "shift": shift, "scale": scale}, "device")
    return torch.ops.mosaic.ln_modulate(x, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------
# gated_residual
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic::gated_residual", mutates_args=())
def _gated_residual_op(res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    backend = _dispatched("gated_residual", select_backend("gated_residual", res.device))
    if backend == "triton":
        return _triton_package()[0].gated_residual_triton(res, gate, y)
    return ref.gated_residual_ref(res, gate, y)


@_gated_residual_op.register_fake
def _(res, gate, y):
    return torch.empty_like(res)


def gated_residual(res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out = res + gate[:, None, :] * y``. Forward-only.

    Args:
        res: (B, L, D) contiguous residual stream.
        gate: (B, D) per-sample gate (unit stride in the last dim).
        y: (B, L, D) contiguous branch output, dtype of ``res``.

    Returns:
        (B, L, D) tensor of ``res.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or ``y.dtype != res.dtype``.
        ValueError: for wrong ranks or shapes, or non-contiguous ``res``/``y``.
        RuntimeError: if a pinned backend cannot run.
    """
    _check_gated_inputs("gated_residual", res, gate, y)
    _check_same("gated_residual", "devices", {"res": res, "gate": gate, "y": y}, "device")
    return torch.ops.mosaic.gated_residual(res, gate, y)


# ---------------------------------------------------------------------------------------------
# gated_residual_ln_modulate
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mosaic::gated_residual_ln_modulate", mutates_args=())
def _gated_residual_ln_modulate_op(
    res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _dispatched("gated_residual_ln_modulate", select_backend(
        "gated_residual_ln_modulate", res.device,
        _cuda_inputs_status("gated_residual_ln_modulate", res, gate, y, shift, scale)))
    if backend == "cuda":
        h = torch.empty_like(res)
        out = torch.empty_like(res)
        torch.ops.mosaic_C.gated_residual_ln_modulate(
            h, out, res, gate.contiguous(), y, shift.contiguous(), scale.contiguous(), eps)
        return h, out
    if backend == "triton":
        return _triton_package()[0].gated_residual_ln_modulate_triton(res, gate, y, shift, scale, eps)
    return ref.gated_residual_ln_modulate_ref(res, gate, y, shift, scale, eps)


@_gated_residual_ln_modulate_op.register_fake
def _(res, gate, y, shift, scale, eps):
    return torch.empty_like(res), torch.empty_like(res)


def gated_residual_ln_modulate(
    res: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = res + gate[:, None, :] * y``; ``normed = LN(h) * (1 + scale[:, None, :]) + shift[:, None, :]``.

    One pass over the rows: the residual update of one sub-block fused with the norm and
    modulation of the next. ``normed`` is computed from ``h`` before it is rounded to the
    output dtype. Forward-only.

    Args:
        res: (B, L, D) contiguous residual stream.
        gate: (B, D) per-sample gate.
        y: (B, L, D) contiguous branch output, dtype of ``res``.
        shift: (B, D) per-sample shift of the next norm.
        scale: (B, D) per-sample scale of the next norm.
        eps: variance epsilon: a finite real number > 0 (not a bool).

    Returns:
        ``(h, normed)``, both (B, L, D) tensors of ``res.dtype``.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, ``y.dtype != res.dtype``, or an
            ``eps`` that is not a number.
        ValueError: for wrong ranks or shapes, non-contiguous ``res``/``y``, or an ``eps`` that
            is not finite and > 0.
        RuntimeError: if a pinned backend cannot run.
    """
    op = "gated_residual_ln_modulate"
    _check_gated_inputs(op, res, gate, y)
    _check_ln_inputs(op, res, shift, scale, eps, x_name="res")
    _check_same(op, "devices", {"res": res, "gate": gate, "y": y, "shift": shift, "scale": scale}, "device")
    return torch.ops.mosaic.gated_residual_ln_modulate(res, gate, y, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------
# GEMM ops: linear_gelu, linear_gated_residual
# ---------------------------------------------------------------------------------------------


def _gemm_path(op: str, x: torch.Tensor, M: int, N: int, K: int) -> str:
    """``"torch"`` (reference), ``"triton"`` (Triton GEMM) or ``"vendor"`` (cuBLAS through torch)."""
    pin = current_backend()
    backend = select_backend(op, x.device)  # raises for a pinned backend that cannot run
    if pin == "torch":
        return "torch"
    if pin == "triton":
        return "triton"  # pinned: the Triton GEMM, whatever the table says
    # auto (a cuda pin follows auto: the GEMM ops have no compiled kernel)
    if backend == "triton":
        cfg = configs.get_config(op, (M, N, K), x.dtype, x.device)
        if cfg.get("backend", "vendor") == "triton":
            return "triton"
    return "vendor" if x.device.type == "cuda" else "torch"


def _addmm_gelu_tanh(bias: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x2d @ weight.T + bias)`` as one cuBLASLt GEMM with its bias + GELU epilogue.

    CUDA only: on CUDA the GELU of ``torch._addmm_activation`` is the tanh approximation
    (cuBLASLt's epilogue, and its non-Lt fallback calls ``gelu(..., "tanh")``); on CPU it is the
    erf GELU. Called with K > 0 only.
    """
    return torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)


def _vendor_linear_gelu(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The vendor path of ``linear_gelu`` on (M, K) rows: cuBLAS(Lt) through torch, (M, N) out.

    Plain torch apart from :func:`_addmm_gelu_tanh` (the CUDA-only fused epilogue), so the
    tests run it on CPU with ``torch._addmm_activation`` replaced by a tanh-GELU spy.
    """
    if x2d.shape[1] == 0:
        # No product to compute: F.linear's K = 0 result (the bias, or zeros), then the GELU,
        # without relying on how cuBLAS(Lt) or torch's empty-input shortcut treats the epilogue.
        acc = x2d.new_zeros(x2d.shape[0], weight.shape[0])
        return F.gelu(acc if bias is None else acc + bias, approximate="tanh")
    if bias is not None:
        return _addmm_gelu_tanh(bias, x2d, weight)
    return F.gelu(x2d @ weight.t(), approximate="tanh")


def _vendor_linear_gated_residual(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  gate: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """The vendor path of ``linear_gated_residual``: cuBLAS ``addmm``, then the gated residual
    (the Triton kernel where it runs on these tensors, else the reference). Plain torch."""
    y2d = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    y = y2d.view(res.shape)
    if _triton_status(res.device)[0]:
        return _triton_package()[0].gated_residual_triton(res, gate, y)
    return ref.gated_residual_ref(res, gate, y)


@torch.library.custom_op("mosaic::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatched("linear_gelu", _gemm_path("linear_gelu", x, x2d.shape[0], N, K))
    if path == "triton":
        out = _triton_package()[0].linear_gelu_triton(x2d, weight, bias)
    elif path == "vendor":
        out = _vendor_linear_gelu(x2d, weight, bias)
    else:
        return ref.linear_gelu_ref(x, weight, bias)
    return out.view(*x.shape[:-1], N)


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = gelu_tanh(x @ weight.T + bias)``. Forward-only.

    On CUDA the default is the vendor path (cuBLASLt GEMM with its bias + GELU epilogue); the
    Triton GEMM with a fused epilogue is chosen per shape by :mod:`mosaic_kernels.configs` or
    by pinning ``triton``.

    Args:
        x: (..., K) contiguous input, float32/float16/bfloat16.
        weight: (N, K) weight of ``x.dtype`` (as ``nn.Linear.weight``).
        bias: (N,) bias of ``x.dtype``, or None.

    Returns:
        (..., N) tensor of ``x.dtype``. K = 0 gives ``gelu_tanh(bias)`` in every row (0 without
        a bias), as ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``. Non-finite values
        follow torch's tanh GELU on every backend: a pre-activation of +inf gives +inf, -inf
        and NaN give NaN (``inf * 0`` in the product is NaN).

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for a 0-d ``x``, mismatched K, a wrong bias shape, or a non-contiguous ``x``.
        RuntimeError: if a pinned backend cannot run.
    """
    _check_linear_inputs("linear_gelu", x, weight, bias, None)
    tensors = {"x": x, "weight": weight} | ({} if bias is None else {"bias": bias})
    _check_same("linear_gelu", "devices", tensors, "device")
    return torch.ops.mosaic.linear_gelu(x, weight, bias)


@torch.library.custom_op("mosaic::linear_gated_residual", mutates_args=())
def _linear_gated_residual_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, res: torch.Tensor
) -> torch.Tensor:
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)  # not reshape(-1, K): K may be 0
    path = _dispatched("linear_gated_residual", _gemm_path("linear_gated_residual", x, x2d.shape[0], N, K))
    if path == "triton":
        return _triton_package()[0].linear_gated_residual_triton(x, weight, bias, gate, res)
    if path == "vendor":
        return _vendor_linear_gated_residual(x2d, weight, bias, gate, res)
    return ref.linear_gated_residual_ref(x, weight, bias, gate, res)


@_linear_gated_residual_op.register_fake
def _(x, weight, bias, gate, res):
    return torch.empty_like(res)


def linear_gated_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, res: torch.Tensor
) -> torch.Tensor:
    """``out = res + gate[:, None, :] * (x @ weight.T + bias)``. Forward-only.

    On CUDA the default is the vendor path (cuBLAS ``addmm``, then the Triton ``gated_residual``
    kernel); the Triton GEMM with the gate/residual epilogue fused is chosen per shape by
    :mod:`mosaic_kernels.configs` or by pinning ``triton``.

    Args:
        x: (B, L, K) contiguous input.
        weight: (N, K) weight of ``x.dtype``.
        bias: (N,) bias of ``x.dtype``, or None.
        gate: (B, N) per-sample gate (unit stride in the last dim).
        res: (B, L, N) contiguous residual stream of ``x.dtype``.

    Returns:
        (B, L, N) tensor of ``res.dtype``. K = 0 gives ``res + gate * bias`` (``res`` without
        a bias), as ``F.linear``.

    Raises:
        TypeError: for a non-tensor or mismatched/unsupported dtypes.
        ValueError: for wrong ranks or shapes, or non-contiguous ``x``/``res``.
        RuntimeError: if a pinned backend cannot run.
    """
    op = "linear_gated_residual"
    _check_linear_inputs(op, x, weight, bias, 3)
    _check_tensor(op, "gate", gate, 2)
    _check_tensor(op, "res", res, 3)
    B, L, _ = x.shape
    N = weight.shape[0]
    if tuple(res.shape) != (B, L, N):
        raise ValueError(f"{op}: res must be (B, L, N)=({B}, {L}, {N}), got {tuple(res.shape)}")
    if res.dtype != x.dtype:
        raise TypeError(f"{op}: res must have the dtype of x ({x.dtype}), got {res.dtype}")
    _check_contiguous(op, "res", res)
    _check_vector(op, "gate", gate, B, N, what="(B, N)")
    tensors = {"x": x, "weight": weight, "gate": gate, "res": res} | ({} if bias is None else {"bias": bias})
    _check_same(op, "devices", tensors, "device")
    return torch.ops.mosaic.linear_gated_residual(x, weight, bias, gate, res)


# ---------------------------------------------------------------------------------------------
# attention (plain function over SDPA)
# ---------------------------------------------------------------------------------------------


#: SDPA kernels `attention` can be pinned to: the configurable ones ("auto" lets torch choose)
#: and "math", the unfused exact fallback.
SDPA_BACKENDS = (*configs.SDPA_BACKENDS, "math")


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


#: Devices on which ``attention`` restores the reference's NaN rows (see its docstring). torch's
#: SDPA kernels treat a softmax row with no finite score as fully masked and write 0 ("safe
#: softmax": the math kernel since torch 2.5; the CPU flash kernel also for a NaN query row).
#: Measured on CPU; on CUDA the guard's extra passes over q and k would cost a memory-bound
#: kernel per call in the hot path, so it is not applied there until measured.
_SDPA_NAN_ROW_GUARD_DEVICES = frozenset({"cpu"})


def _check_num_heads(num_heads: Any) -> int:
    """An integral, non-bool num_heads > 0 (int, NumPy integer, anything with ``__index__``)."""
    if isinstance(num_heads, bool):
        raise TypeError(f"attention: num_heads must be an int, not a bool, got {num_heads!r}")
    try:
        value = operator.index(num_heads)
    except TypeError:
        raise TypeError(
            f"attention: num_heads must be an int, got {num_heads!r} ({type(num_heads).__name__})") from None
    if value <= 0:
        raise ValueError(f"attention: num_heads must be a positive int, got {value}")
    return value


def _nan_rows_without_finite_score(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """NaN in every (b, h, l) output row whose reference softmax is NaN because no score is finite.

    For non-finite inputs a row of ``q k^T`` has no finite score exactly when the query row
    holds a NaN/inf (each of its scores is then +-inf or NaN) or every key row of the head does
    (idem). The reference softmax of such a row is NaN; SDPA writes 0. Rows with a finite score
    come out of SDPA as from the reference (a NaN/+inf score still poisons the row, -inf scores
    get weight 0, a NaN/inf in v reaches its column).
    """
    no_finite_score = ~torch.isfinite(q).all(-1) | ~torch.isfinite(k).all(-1).any(-1, keepdim=True)  # (B, H, L)
    return out.masked_fill(no_finite_score.unsqueeze(-1), float("nan"))


def attention(qkv: torch.Tensor, num_heads: int, backend: str | None = None) -> torch.Tensor:
    """``out = softmax(q @ k^T / sqrt(hd)) @ v`` over ``num_heads`` heads (non-causal). Forward-only.

    ``q``, ``k`` and ``v`` are strided views of ``qkv`` (no copies) handed to
    ``F.scaled_dot_product_attention``; any ``head_dim`` (e.g. 72 or 32) works. Which SDPA kernel
    runs matters at DiT's head_dim 72 (FlashAttention pads it to a 96-wide kernel): by default it
    comes from :mod:`mosaic_kernels.configs` per shape (``{"sdpa_backend": ...}``, "auto" unless
    measured otherwise, see ``configs.autotune("attention", ...)``). This is a plain function,
    not a custom op, so ``torch.compile`` sees the SDPA call.

    Args:
        qkv: (B, L, 3 * H * hd) fused projections laid out ``[q | k | v]``, heads contiguous
            within each part; unit stride in the last dim.
        num_heads: H > 0: an int or NumPy integer (anything with ``__index__``), not a bool.
        backend: one of :data:`SDPA_BACKENDS` to pin the SDPA kernel; None: the configured one.

    Returns:
        (B, L, H * hd) contiguous tensor of ``qkv.dtype``. Non-finite inputs: on CPU the NaN/inf
        pattern is the reference's (plain softmax) under every SDPA kernel: a NaN/inf in a query
        row, or in every key row of a head, makes those output rows NaN where torch's SDPA
        writes 0 (:data:`_SDPA_NAN_ROW_GUARD_DEVICES`). On CUDA the SDPA kernel's own semantics
        apply.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype, or a ``num_heads`` that is not an
            integer (or is a bool).
        ValueError: for a wrong rank, ``num_heads <= 0``, a width not divisible by
            ``3 * num_heads``, a non-unit last-dim stride or an unknown backend.
        RuntimeError: if the pinned SDPA backend cannot run these inputs (torch's message).
    """
    _check_tensor("attention", "qkv", qkv, 3)
    num_heads = _check_num_heads(num_heads)
    B, L, width = qkv.shape
    if width % (3 * num_heads) != 0 or width == 0:
        raise ValueError(
            f"attention: qkv's last dim must be 3 * num_heads * head_dim with num_heads={num_heads}, got {width}")
    if qkv.stride(2) != 1:
        raise ValueError(f"attention: qkv must have unit stride in its last dim, got strides {qkv.stride()}")
    hd = width // (3 * num_heads)
    if backend is None:
        # Under torch.compile the SDPA kernel is the compiler's choice (and the config lookup,
        # a locked dict, is not traceable with fullgraph=True).
        backend = "auto" if torch.compiler.is_compiling() else configs.get_config(
            "attention", (B, L, num_heads, hd), qkv.dtype, qkv.device)["sdpa_backend"]
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"attention: backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    _dispatched("attention", f"sdpa_{backend}")
    # (B, L, 3, H, hd) -> three (B, H, L, hd) strided views.
    q, k, v = qkv.unflatten(-1, (3, num_heads, hd)).permute(2, 0, 3, 1, 4).unbind(0)
    if backend == "auto":
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backend_enum(backend)]):
            out = F.scaled_dot_product_attention(q, k, v)
    if qkv.device.type in _SDPA_NAN_ROW_GUARD_DEVICES:
        out = _nan_rows_without_finite_score(out, q, k)
    return out.transpose(1, 2).reshape(B, L, num_heads * hd)

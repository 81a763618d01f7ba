"""Input checks of the public ops, shared by the op modules.

Each public op validates its inputs once, with these helpers, before it calls its custom op;
the Triton launchers and the compiled kernels' ``TORCH_CHECK``s are only the last guard. Errors
name the op and state the expected and the actual value (``TypeError`` for types and dtypes,
``ValueError`` for shapes, strides and values).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t: Any, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}; "
            f"call .contiguous() first"
        )


def check_vector(op: str, name: str, t: torch.Tensor, B: int, D: int, what: str = "(B, D)") -> None:
    """A per-sample (B, D) vector with unit stride in its last dim."""
    if tuple(t.shape) != (B, D):
        raise ValueError(f"{op}: {name} must be {what}=({B}, {D}), got {tuple(t.shape)}")
    if D > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride in its last dim, got strides {t.stride()}")


def check_affine(op: str, D: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """An affine LayerNorm's (D,) contiguous weight and bias, each optional."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, 1)
            if tuple(t.shape) != (D,):
                raise ValueError(f"{op}: {name} must be (D,)=({D},), got {tuple(t.shape)}")
            check_contiguous(op, name, t)


def check_table_rows(op: str, D: int, rows: dict[str, torch.Tensor]) -> None:
    """Per-channel (D,) table rows (adaLN-single's ``scale_shift_table``) with unit stride."""
    for name, t in rows.items():
        check_tensor(op, name, t, 1)
        if tuple(t.shape) != (D,):
            raise ValueError(f"{op}: {name} must be (D,)=({D},), got {tuple(t.shape)}")
        if D > 1 and t.stride(0) != 1:
            raise ValueError(f"{op}: {name} must have unit stride, got strides {t.stride()}")


def check_same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    values = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(values.values())) > 1:
        raise ValueError(f"{op}: devices must match, got " + ", ".join(f"{k}={v}" for k, v in values.items()))


def check_eps(op: str, eps: Any) -> float:
    """eps: a real number (Python or NumPy; not a bool or a tensor), finite and > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a positive finite float, got {eps!r} ({type(eps).__name__})")
    if not 0 < eps < math.inf:  # comparisons, not math.isfinite: torch.compile(dynamic=True) passes a SymFloat
        raise ValueError(f"{op}: eps must be a positive finite float, got {eps!r}")
    return float(eps)


def check_ln_inputs(op: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: Any,
                    x_name: str = "x") -> None:
    """(B, L, D) rows with (B, D) shift and scale, and an eps."""
    check_tensor(op, x_name, x, 3)
    check_tensor(op, "shift", shift, 2)
    check_tensor(op, "scale", scale, 2)
    B, _, D = x.shape
    check_vector(op, "shift", shift, B, D)
    check_vector(op, "scale", scale, B, D)
    check_eps(op, eps)


def check_gated_inputs(op: str, res: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    """(B, L, D) contiguous ``res`` and ``y`` of one dtype, and a (B, D) gate."""
    check_tensor(op, "res", res, 3)
    check_tensor(op, "gate", gate, 2)
    check_tensor(op, "y", y, 3)
    if y.shape != res.shape:
        raise ValueError(f"{op}: y must have the shape of res {tuple(res.shape)}, got {tuple(y.shape)}")
    if y.dtype != res.dtype:
        raise TypeError(f"{op}: y must have the dtype of res ({res.dtype}), got {y.dtype}")
    check_contiguous(op, "res", res)
    check_contiguous(op, "y", y)
    B, _, D = res.shape
    check_vector(op, "gate", gate, B, D)


def check_linear_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        x_ndim: int | None) -> None:
    """A contiguous (..., K) ``x`` (exactly ``x_ndim`` dims when given), an (N, K) weight and an
    (N,) bias or None, all of one dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x_ndim is None and x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., K), got shape {tuple(x.shape)}")
    check_tensor(op, "x", x, x_ndim if x_ndim is not None else x.dim())
    check_tensor(op, "weight", weight, 2)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x's last dim must equal weight.shape[1]={K}, got x shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    check_contiguous(op, "x", x)
    if weight.stride(1) != 1 and weight.stride(0) != 1:
        raise ValueError(f"{op}: weight must be contiguous in one dim, got strides {weight.stride()}")
    if bias is not None:
        check_tensor(op, "bias", bias, 1)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must be (N,)=({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias must have the dtype of x ({x.dtype}), got {bias.dtype}")

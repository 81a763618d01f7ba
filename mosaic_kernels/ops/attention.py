"""``attention``: multi-head softmax attention over a fused qkv projection, through SDPA.

A plain function, not a custom op: ``torch.compile`` sees the SDPA call. Which SDPA kernel runs
is chosen per shape (:mod:`mosaic_kernels.configs`). Reference ``reference.attention_ref``;
tests ``tests/kernels/test_attention.py``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from .. import configs
from .. import reference as ref
from . import _checks, _dispatch
from ..op_registry import BenchCase, Choice, attention_bucket, random_maker, register

OP = "attention"

#: SDPA kernels the per-shape choice picks from ("auto": torch's own choice).
SDPA_CHOICES = ("auto", "flash", "efficient", "cudnn")
#: SDPA kernels `attention` can be pinned to: the chosen ones and "math", the unfused exact fallback.
SDPA_BACKENDS = (*SDPA_CHOICES, "math")

#: How the fused projections are laid out along the last dim: "qkv" = ``[q | k | v]`` (each part
#: H * hd wide, heads contiguous: diffusers' and timm's order); "heads" = ``[q k v of head 0 | q k v
#: of head 1 | ...]`` (head-major: a contiguous run of heads is a contiguous run of qkv weight
#: rows, which is what lets pruned stages share one qkv weight as row-range views).
QKV_LAYOUTS = ("qkv", "heads")

#: Devices on which ``attention`` restores the reference's NaN rows (see its docstring). torch's
#: SDPA kernels treat a softmax row with no finite score as fully masked and write 0 ("safe
#: softmax": the math kernel since torch 2.5; the CPU flash kernel also for a NaN query row).
#: Measured on CPU; on CUDA the guard's extra passes over q and k would cost a memory-bound
#: kernel per call in the hot path, so it is not applied there until measured.
_SDPA_NAN_ROW_GUARD_DEVICES = frozenset({"cpu"})


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


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


def split_qkv(qkv: torch.Tensor, num_heads: int, layout: str = "qkv") -> tuple[torch.Tensor, ...]:
    """``(q, k, v)``, each ``(B, H, L, hd)``: strided views of ``qkv`` laid out as `layout`."""
    hd = qkv.shape[-1] // (3 * num_heads)
    if layout == "qkv":  # (B, L, 3, H, hd)
        return qkv.unflatten(-1, (3, num_heads, hd)).permute(2, 0, 3, 1, 4).unbind(0)
    return qkv.unflatten(-1, (num_heads, 3, hd)).permute(3, 0, 2, 1, 4).unbind(0)  # (B, L, H, 3, hd)


def attention(qkv: torch.Tensor, num_heads: int, backend: str | None = None, layout: str = "qkv") -> torch.Tensor:
    """``out = softmax(q @ k^T / sqrt(hd)) @ v`` over ``num_heads`` heads (non-causal). Differentiable.

    Plain torch around SDPA, so autograd differentiates it with SDPA's own backward (no custom op,
    no registered formula). ``q``, ``k`` and ``v`` are strided views of ``qkv`` (no copies) handed to
    ``F.scaled_dot_product_attention``; any ``head_dim`` (e.g. 72 or 32) works. Which SDPA kernel
    runs matters at DiT's head_dim 72 (FlashAttention pads it to a 96-wide kernel): by default it
    comes from :mod:`mosaic_kernels.configs` per shape (``{"sdpa_backend": ...}``, "auto" unless
    measured otherwise, see ``configs.measure("attention", ...)``).

    Args:
        qkv: (B, L, 3 * H * hd) fused projections laid out as `layout`; unit stride in the
            last dim.
        num_heads: H > 0: an int or NumPy integer (anything with ``__index__``), not a bool.
        backend: one of :data:`SDPA_BACKENDS` to pin the SDPA kernel; None: the chosen one.
        layout: one of :data:`QKV_LAYOUTS` (default ``"qkv"``: ``[q | k | v]``).

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
            ``3 * num_heads``, a non-unit last-dim stride, an unknown backend or layout.
        RuntimeError: if the pinned SDPA backend cannot run these inputs (torch's message).
    """
    _checks.check_tensor(OP, "qkv", qkv, 3)
    num_heads = _check_num_heads(num_heads)
    B, L, width = qkv.shape
    if width % (3 * num_heads) != 0 or width == 0:
        raise ValueError(
            f"attention: qkv's last dim must be 3 * num_heads * head_dim with num_heads={num_heads}, got {width}")
    if qkv.stride(2) != 1:
        raise ValueError(f"attention: qkv must have unit stride in its last dim, got strides {qkv.stride()}")
    hd = width // (3 * num_heads)
    if layout not in QKV_LAYOUTS:
        raise ValueError(f"attention: layout must be one of {QKV_LAYOUTS}, got {layout!r}")
    if backend is None:
        # Under torch.compile the SDPA kernel is the compiler's choice (and the config lookup,
        # a locked dict, is not traceable with fullgraph=True).
        backend = "auto" if torch.compiler.is_compiling() else configs.get_config(
            OP, (B, L, num_heads, hd), qkv.dtype, qkv.device)["sdpa_backend"]
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"attention: backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    _dispatch.dispatched(OP, f"sdpa_{backend}")
    q, k, v = split_qkv(qkv, num_heads, layout)  # three (B, H, L, hd) strided views
    if backend == "auto":
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backend_enum(backend)]):
            out = F.scaled_dot_product_attention(q, k, v)
    if qkv.device.type in _SDPA_NAN_ROW_GUARD_DEVICES:
        out = _nan_rows_without_finite_score(out, q, k)
    return out.transpose(1, 2).reshape(B, L, num_heads * hd)


def attention_eager(qkv, num_heads, layout: str = "qkv"):
    """Plain SDPA over the fused projections (torch's kernel choice, no NaN-row guard)."""
    B, L, width = qkv.shape
    q, k, v = split_qkv(qkv, num_heads, layout)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)


def _inputs(shape, dtype, device, generator):
    B, L, H, hd = shape
    return random_maker(device, dtype, generator)(B, L, 3 * H * hd), H


def _providers() -> dict:
    """Each SDPA kernel pinned (head_dim 72: which one wins is measured)."""
    return {f"sdpa_{b}": (lambda qkv, h, _b=b: attention(qkv, h, backend=_b)) for b in SDPA_CHOICES}


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=lambda shape, e: e * shape[0] * shape[1] * 4 * shape[2] * shape[3],
    flops=lambda shape: 4 * shape[0] * shape[2] * shape[1] * shape[1] * shape[3],
    reference=ref.attention_ref,
    providers=_providers,
    model_shapes=lambda batch: [(batch, 256, h, 72) for h in (16, 8)],  # DiT-XL/2: 16 heads, 8 kept
    tiny_shape=(2, 16, 2, 32),
    eager=attention_eager,
    choice=Choice(field="sdpa_backend", options={b: f"sdpa_{b}" for b in SDPA_CHOICES}, default="auto",
                  bucket=attention_bucket),
))

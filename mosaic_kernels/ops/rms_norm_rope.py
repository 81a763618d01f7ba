"""``rms_norm_rope``: the per-head RMSNorm of q or k, then rotary embeddings, in one pass over the rows.

SD3.5 normalizes q and k per head (``RMSNorm`` over head_dim, no RoPE); Flux then rotates them
(``apply_rotary_emb``, pairs ``(2i, 2i+1)``). ``out=`` writes into a slice of a larger buffer
(the joint ``[text | image]`` sequence of Flux's two streams, without a ``torch.cat``).

Kernel: ``mosaic_kernels/triton/rms_norm_rope.py``; reference ``reference.rms_norm_rope_ref``;
tests ``tests/kernels/test_rms_norm_rope.py``. No compiled CUDA kernel (auto order: Triton, then
the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _autograd, _checks, _dispatch
from ..op_registry import BenchCase, TritonCase, eager_providers, random_maker, register

OP = "rms_norm_rope"


@torch.library.custom_op("mosaic::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, eps: float) -> torch.Tensor:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, x.device))
    if backend == "triton" and x.numel() > 0:
        return _dispatch.triton_package()[0].rms_norm_rope_triton(x, weight, cos, sin, eps)
    return ref.rms_norm_rope_ref(x, weight, cos, sin, eps).contiguous()  # as the fake: a strided x gives a dense out


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps):
    return x.new_empty(x.shape)


_autograd.register_reference_backward(_rms_norm_rope_op, ref.rms_norm_rope_ref)


# The destination-passing form behind ``out=``: a mutating op has no autograd formula, so
# ``out=`` is refused when an input requires grad (as torch's own ``out=`` functions).
@torch.library.custom_op("mosaic::rms_norm_rope_out", mutates_args=("out",))
def _rms_norm_rope_out_op(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                          cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float) -> None:
    backend = _dispatch.dispatched(OP, _dispatch.select_backend(OP, x.device))
    if backend == "triton" and x.numel() > 0:
        _dispatch.triton_package()[0].rms_norm_rope_triton(x, weight, cos, sin, eps, out=out)
    else:
        out.copy_(ref.rms_norm_rope_ref(x, weight, cos, sin, eps))


@_rms_norm_rope_out_op.register_fake
def _(out, x, weight, cos, sin, eps):
    return None


def _check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{OP}: {name} must have unit stride in its last dim, got strides {t.stride()}")


def _check_rope(cos: torch.Tensor | None, sin: torch.Tensor | None, S: int, D: int) -> None:
    if (cos is None) != (sin is None):
        raise ValueError(f"{OP}: cos and sin must be given together ((S, D) float32 each) or both None, "
                         f"got cos={type(cos).__name__}, sin={type(sin).__name__}")
    if cos is None:
        return
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{OP}: {name} must be float32 (diffusers computes RoPE in float32), got {t.dtype}")
        if tuple(t.shape) != (S, D):
            raise ValueError(f"{OP}: {name} must be (S, D)=({S}, {D}), got {tuple(t.shape)}")
        _check_unit_last_stride(name, t)
    if D % 2:
        raise ValueError(f"{OP}: D must be even with RoPE (pairs (2i, 2i+1) rotate), got D={D}")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{OP}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{OP}: out must have x's shape (B, S, H, D)={tuple(x.shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"{OP}: out must have x's dtype ({x.dtype}), got {out.dtype}")
    _check_unit_last_stride("out", out)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, eps: float = 1e-6,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2) + eps) * weight``, then RoPE ``y * cos + rot(y) * sin`` (optional).

    Step 1: diffusers' ``RMSNorm`` of each head's row (over D). Step 2, when ``cos``/``sin`` are
    given: Flux's ``apply_rotary_emb(y, (cos, sin), use_real=True, use_real_unbind_dim=-1,
    sequence_dim=1)``, i.e. ``out[2i] = y[2i] cos[2i] - y[2i+1] sin[2i]`` and ``out[2i+1] =
    y[2i+1] cos[2i+1] + y[2i] sin[2i+1]``. Computed in fp32 with the roundings of the diffusers
    modules it replaces (SD3.5's ``RMSNorm`` without RoPE, Flux's ``torch.nn.RMSNorm`` with it; see
    :func:`mosaic_kernels.reference.rms_norm_rope_ref`). Differentiable without ``out=``.

    Args:
        x: (B, S, H, D) queries or keys, float32/float16/bfloat16, unit stride in the last dim,
            other strides arbitrary (a head view of a fused qkv projection output needs no copy).
        weight: (D,) RMSNorm scale of any of those dtypes (unit stride), or None (no affine).
        cos: (S, D) float32 cosines (unit stride in the last dim), or None: RMSNorm only (SD3.5).
        sin: (S, D) float32 sines, given with ``cos``.
        eps: the RMSNorm epsilon: a finite real number > 0 (not a bool).
        out: optional (B, S, H, D) destination of ``x.dtype`` with unit stride in its last dim
            (e.g. a slice of a joint ``[text | image]`` buffer); must not overlap ``x``. Not
            differentiable: refused when an input requires grad.

    Returns:
        ``out``, or a new contiguous (B, S, H, D) tensor of ``x.dtype``. Empty inputs give an
        empty output.

    Raises:
        TypeError: for a non-tensor, an unsupported dtype (cos/sin: not float32), an ``out`` of
            another dtype, or an ``eps`` that is not a number.
        ValueError: for a non-4-D ``x``, a weight that is not (D,), cos/sin not (S, D) or not
            given together, an odd D with RoPE, a last dim that is not unit-stride, mismatched
            devices, or an ``eps`` that is not finite and > 0.
        RuntimeError: for ``out=`` with an input that requires grad, or a pinned backend that
            cannot run.
    """
    _checks.check_tensor(OP, "x", x, 4)
    _check_unit_last_stride("x", x)
    _, S, _, D = x.shape
    if weight is not None:
        _checks.check_tensor(OP, "weight", weight, 1)
        if tuple(weight.shape) != (D,):
            raise ValueError(f"{OP}: weight must be (D,)=({D},), got {tuple(weight.shape)}")
        _check_unit_last_stride("weight", weight)
    _check_rope(cos, sin, S, D)
    eps = _checks.check_eps(OP, eps)
    if out is not None:
        _check_out(out, x)
    _checks.check_same_device(OP, {"x": x, "weight": weight, "cos": cos, "sin": sin, "out": out})
    if out is None:
        return torch.ops.mosaic.rms_norm_rope(x, weight, cos, sin, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, cos, sin)):
        raise RuntimeError(f"{OP}: out= does not support automatic differentiation, but an input requires grad; "
                           f"call it without out=")
    torch.ops.mosaic.rms_norm_rope_out(out, x, weight, cos, sin, eps)
    return out


def rms_norm_rope_eager(x, weight, cos=None, sin=None, eps=1e-6, out=None):
    """What diffusers runs (input dtype): SD3.5's ``RMSNorm.forward``, or Flux's ``torch.nn.RMSNorm``
    then ``apply_rotary_emb``; ``out=`` is a copy (what its ``torch.cat`` of the streams costs)."""
    if cos is None:
        y = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = (y.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else y) * weight
    else:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)
        real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        y = y.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]
    return y.to(x.dtype) if out is None else out.copy_(y)


# ---------------------------------------------------------------------------------------------
# Benchmark case. Canonical shape (B, S, H, D, rope): rope 1 passes cos/sin, 0 none.
# ---------------------------------------------------------------------------------------------


def rope_tables(S: int, D: int, device, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) float32 cos and sin of random angles, each value repeated over its pair (as Flux's)."""
    angles = torch.rand(S, D // 2, generator=generator, device=device) * (2 * math.pi)
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _inputs(shape, dtype, device, generator):
    B, S, H, D, rope = shape
    rnd = random_maker(device, dtype, generator)
    x = rnd(B, S, 3, H, D)[:, :, 1]  # the keys of a fused qkv projection: a strided view, as models pass it
    weight = 1 + rnd(D, scale=0.1)
    return (x, weight, *(rope_tables(S, D, device, generator) if rope else (None, None)))


def _launch_triton(shape, dtype, config, alloc):
    B, S, H, D, rope = shape
    x = alloc(B, S, 3, H, D)[:, :, 1]
    cos, sin = (torch.empty(S, D), torch.empty(S, D)) if rope else (None, None)
    _dispatch.triton_package()[0].rms_norm_rope_triton(x, alloc(D), cos, sin, 1e-6, config=config)


def _triton_configs(shape, dtype):
    from ..triton.settings import row_settings

    return [("row_settings", row_settings(OP, shape[3], dtype))]


def _bytes_moved(shape, e):
    B, S, H, D, rope = shape
    return e * (2 * B * S * H * D + D) + (2 * 4 * S * D if rope else 0)


register(BenchCase(
    op=OP,
    make_inputs=_inputs,
    bytes_moved=_bytes_moved,
    reference=ref.rms_norm_rope_ref,
    providers=lambda: {**eager_providers(rms_norm_rope_eager), "triton": _dispatch.pinned(rms_norm_rope, "triton")},
    # Flux-dev at 1024 px: 4096 image + 512 text tokens, 24 heads of 128, RoPE (guidance-distilled:
    # no CFG batch). SD3.5-Large: 4096 image + 333 text tokens (77 CLIP + 256 T5), 38 heads of 64,
    # no RoPE, CFG doubles the batch.
    model_shapes=lambda batch: [(batch, 4096 + 512, 24, 128, 1), (2 * batch, 4096 + 333, 38, 64, 0)],
    tiny_shape=(2, 5, 3, 24, 1),
    eager=rms_norm_rope_eager,
    triton=TritonCase(family="row", configs=_triton_configs, launch=_launch_triton),
))

"""FP8 ``nn.Linear`` for the diffusers baselines of the GPU suite: what torchao's
``float8_dynamic_activation_float8_weight`` does, in a few lines of plain torch.

The GPU machine has no torchao (and no network), so the "diffusers + FP8" baseline swaps the
``nn.Linear`` modules itself (`swap_fp8_linears`): each weight is stored as ``float8_e4m3fn`` with
one fp32 scale per output channel; at run time each activation row (token) is scaled to the
float8 range and the product runs through ``torch._scaled_mm`` with row-wise scales (FP8 tensor
cores, CUDA compute capability >= 8.9), the bias added after. ``torch.compile`` traces it (the
activation quantization fuses into the neighbouring kernels). Elsewhere -- the CPU dry run, an
sm_80 card -- the same quantized values are multiplied in fp32 (`FP8Linear.uses_scaled_mm` says
which path runs): the numbers are the FP8 model's, the speed is not FP8's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` runs on FP8 tensor cores on ``device`` (CUDA, cc >= 8.9)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``x ~= q * scale``: float8 rows of a 2-D tensor and fp32 (rows, 1) scales."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """An ``nn.Linear`` with float8 weights (per output channel) and per-token float8 activations.

    Args:
        linear (`nn.Linear`): the layer to replace; its in and out features must be multiples of
            16 (``torch._scaled_mm``'s alignment).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"FP8Linear: in_features and out_features must be multiples of 16, got "
                             f"{linear.in_features} x {linear.out_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", q)  # (N, K) row-major: its .t() is the column-major B
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.uses_scaled_mm = fp8_supported(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = quantize_rows(rows)
        if self.uses_scaled_mm:
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:  # the same quantized operands, multiplied in fp32
            y = F.linear(xq.float() * x_scale, self.weight_fp8.float() * self.weight_scale.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def swap_fp8_linears(model: nn.Module, include: tuple[str, ...]) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose qualified name contains one of ``include``
    (e.g. ``("attn1.", "ff.")``) by an `FP8Linear`, in place.

    Returns:
        `list[str]`: the names of the swapped layers.

    Raises:
        ValueError: when ``include`` is empty or matches no ``nn.Linear``.
    """
    if not include:
        raise ValueError("swap_fp8_linears: include must name at least one module name fragment, got ()")
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(part in name for part in include):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, FP8Linear(module))
            swapped.append(name)
    if not swapped:
        raise ValueError(f"swap_fp8_linears: include {include} matches no nn.Linear of {type(model).__name__}")
    return swapped

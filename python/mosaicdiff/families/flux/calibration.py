"""What a Flux is calibrated with: a `ConditionedCalibration` of unpacked latents and the pipeline's prompt
embeddings, without a CFG branch, checked against the model before any calibration pass.

``latents``: ``(N, in_channels // 4, H, W)`` VAE latents as the pipeline's denoising loop sees them
(``(vae_latents - shift_factor) * scaling_factor``), unpacked (``FluxPipeline._unpack_latents``);
H and W even. The adapter packs them into 2x2 patches for each forward (`pack_latents`).

``conditions``: ``encoder_hidden_states`` (``(N, S, joint_attention_dim)``: the pipeline's T5
``prompt_embeds``), ``pooled_projections`` (``(N, pooled_projection_dim)``: the CLIP
``pooled_prompt_embeds``), for a guidance-distilled model (``guidance_embeds``, FLUX.1-dev)
``guidance`` (the guidance scale, a number or one per latent, as the pipeline passes it: the
model multiplies it by 1000 itself), and optionally ``txt_ids`` (``(S, 3)``) and ``img_ids``
(``(H/2 * W/2, 3)``), shared by every row (wrap them in `Shared`); by default the pipeline's
(zeros, and the latent grid's row / column).

Flux has no unconditional branch: ``ConditionedCalibration(latents, conditions, cfg=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mosaicdiff.method.conditioned_calibration import check_finite, shape_of

__all__ = ["NO_CFG", "check_flux_calibration", "flux_forward_inputs", "image_ids", "pack_latents", "unpack_latents"]

NO_CFG = ("Flux is guidance-distilled and sampled without classifier-free guidance: calibrate with "
          "ConditionedCalibration(latents, {'encoder_hidden_states': prompt_embeds, 'pooled_projections': "
          "pooled_prompt_embeds, 'guidance': 3.5}, cfg=False)")

_KEYS = ("encoder_hidden_states", "pooled_projections", "guidance", "txt_ids", "img_ids")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents as Flux's ``(B, H/2 * W/2, 4C)`` sequence of 2x2 patches (``FluxPipeline._pack_latents``)."""
    B, C, H, W = latents.shape
    x = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: ``(B, H/2 * W/2, 4C)`` -> ``(B, C, H, W)`` (latent height and width)."""
    B, _, D = packed.shape
    x = packed.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The pipeline's ``img_ids`` of a ``height x width`` patch grid: ``(height * width, 3)`` rows ``(0, row, col)``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def flux_forward_inputs(x_t: torch.Tensor, t: torch.Tensor, condition: Mapping[str, Any]) -> dict[str, Any]:
    """The dense Flux forward's keyword arguments of a calibration batch (`FluxAdapter.run`): packed
    latents, ``timestep = t / 1000``, the default ids and the guidance broadcast to the batch."""
    B, _, H, W = x_t.shape
    kwargs = dict(condition)
    text = kwargs["encoder_hidden_states"]
    if kwargs.get("img_ids") is None:
        kwargs["img_ids"] = image_ids(H // 2, W // 2, x_t.device, x_t.dtype)
    if kwargs.get("txt_ids") is None:
        kwargs["txt_ids"] = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    guidance = kwargs.get("guidance")
    if guidance is not None:
        kwargs["guidance"] = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).reshape(-1).expand(B)
    timestep = t.to(device=x_t.device, dtype=torch.float32).reshape(-1).expand(B) / 1000
    return {"hidden_states": pack_latents(x_t), "timestep": timestep, **kwargs}




def _check_rows(where: str, value: Any, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        raise ValueError(f"{where} must be {shape} ({what}), got {shape_of(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{where} must be floating point, got {value.dtype}")
    check_finite(where, value)


def check_flux_calibration(model: nn.Module, calibration: Any) -> None:
    """Check a `ConditionedCalibration` against an (unwrapped) ``FluxTransformer2DModel``.

    Raises:
        TypeError: not a `ConditionedCalibration`, one without ``encoder_hidden_states`` (another
            family's keys), integer text states.
        ValueError: a CFG branch (``cfg=True``), unknown condition keys, latents of another channel
            count or odd H / W, text states or pooled projections of another width or rows, ids of
            another shape or split by row, guidance missing for a guidance-distilled model (or given
            to one without guidance embeddings), NaN/inf.
    """
    from mosaicdiff.method.calibrate import ConditionedCalibration, Shared

    if not isinstance(calibration, ConditionedCalibration):
        raise TypeError(f"a Flux is calibrated with a ConditionedCalibration; {NO_CFG}; got {type(calibration).__name__}")
    cond, n, cfg = calibration.conditions, len(calibration), model.config
    if "encoder_hidden_states" not in cond:
        raise TypeError(f"{NO_CFG}; got conditions with keys {sorted(cond)}")
    if calibration.cfg:
        raise ValueError(NO_CFG)
    where = "ConditionedCalibration.conditions"
    unknown = sorted(set(cond) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where} has keys {unknown} that FluxTransformer2DModel.forward does not take here; the "
                         f"keys are {list(_KEYS)}")
    latents = calibration.latents
    channels = int(cfg.in_channels) // 4
    if latents.shape[1] != channels or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"calibration latents are {tuple(latents.shape[1:])} (C, H, W); Flux takes unpacked latents "
                         f"of {channels} channels (config.in_channels / 4) with even H and W (FluxPipeline."
                         f"_unpack_latents of the packed ones)")
    text = cond["encoder_hidden_states"]
    if not isinstance(text, torch.Tensor) or text.dim() != 3:
        raise ValueError(f"{where}['encoder_hidden_states'] must be ({n}, S, {cfg.joint_attention_dim}), got "
                         f"{shape_of(text)}")
    seq = int(text.shape[1])
    _check_rows(f"{where}['encoder_hidden_states']", text, (n, seq, int(cfg.joint_attention_dim)),
                "the T5 prompt_embeds, one row per latent; config.joint_attention_dim")
    _check_rows(f"{where}['pooled_projections']", cond.get("pooled_projections"), (n, int(cfg.pooled_projection_dim)),
                "the CLIP pooled_prompt_embeds, one row per latent; config.pooled_projection_dim")
    rows = calibration.condition_rows(torch.arange(1))
    tokens = (latents.shape[2] // 2) * (latents.shape[3] // 2)
    for key, length in (("txt_ids", seq), ("img_ids", tokens)):
        if cond.get(key) is None:
            continue
        if not isinstance(rows[key], Shared):
            raise ValueError(f"{where}[{key!r}] is split by row (its first dimension is the number of latents); wrap "
                             f"it in mosaicdiff.calibrate.Shared: every row shares the ids")
        _check_rows(f"{where}[{key!r}]", cond[key], (length, 3), "position ids shared by every row")
    guidance = cond.get("guidance")
    if cfg.guidance_embeds and guidance is None:
        raise ValueError(f"this Flux embeds the guidance scale (config.guidance_embeds, FLUX.1-dev): {where} needs "
                         f"'guidance', the guidance_scale the pipeline samples with (e.g. 3.5)")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError(f"this Flux has no guidance embedding (config.guidance_embeds=False, FLUX.1-schnell): leave "
                         f"{where}['guidance'] out")
    if isinstance(guidance, torch.Tensor) and (guidance.numel() not in (1, n) or not guidance.is_floating_point()):
        raise ValueError(f"{where}['guidance'] must be a number or a float tensor of 1 or {n} values, got "
                         f"{shape_of(guidance)} {guidance.dtype}")

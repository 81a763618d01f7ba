"""What a PixArt is calibrated with: a `ConditionedCalibration` of latents and the pipeline's prompt
embeddings, checked against the model before any calibration pass.

``conditions``: ``encoder_hidden_states`` (the T5 states, ``(N, S, caption_channels)``: the
pipeline's ``prompt_embeds``), optionally ``encoder_attention_mask`` (``(N, S)``, 1 = keep: the
pipeline's ``prompt_attention_mask``) and, for a model with ``use_additional_conditions``
(PixArt-alpha 1024), ``added_cond_kwargs={"resolution": (N, 2), "aspect_ratio": (N, 1)}``.

``null_conditions`` (the CFG branch): the negative prompt's ``negative_prompt_embeds`` and
``negative_prompt_attention_mask``, one row for all or one per latent. There is no default:
PixArt's unconditional input is the T5 embedding of ``""`` (an EOS token and padding), which
zeros would not reproduce, and calibrating the CFG half of every batch on inputs the model never
sees would bias the Hessians silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mosaicdiff.method.conditioned_calibration import check_finite, shape_of

__all__ = ["NULL_CONDITIONS_NEEDED", "check_pixart_calibration"]

NULL_CONDITIONS_NEEDED = (
    "a PixArt calibration needs null_conditions for the classifier-free-guidance branch: the negative prompt's "
    "embeddings, e.g. ConditionedCalibration(latents, {'encoder_hidden_states': prompt_embeds, "
    "'encoder_attention_mask': prompt_attention_mask}, {'encoder_hidden_states': negative_prompt_embeds, "
    "'encoder_attention_mask': negative_prompt_attention_mask}) from pipe.encode_prompt(...) (PixArt's null input "
    "is the T5 embedding of \"\", not zeros); or cfg=False to calibrate without guidance")

_KIND = ("a PixArt is calibrated with ConditionedCalibration(latents, {'encoder_hidden_states': prompt_embeds, "
         "'encoder_attention_mask': prompt_attention_mask}, null_conditions)")




def _check_text(where: str, text: Any, n: int | None, seq: int | None, width: int) -> None:
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or (n is not None and text.shape[0] != n) \
            or (seq is not None and text.shape[1] != seq):
        rows = "N" if n is None else n
        raise ValueError(f"{where} must be ({rows}, S{'' if seq is None else '=' + str(seq)}, {width}): text states, "
                         f"one row per latent, got {shape_of(text)}")
    if text.shape[-1] != width:
        raise ValueError(f"{where} has width {text.shape[-1]}, the model's text width is {width} "
                         f"(config.caption_channels, the T5 width; cross_attention_dim without a caption projection)")
    if not text.is_floating_point():
        raise TypeError(f"{where} must be floating point, got {text.dtype}")
    check_finite(where, text)


def _check_mask(where: str, mask: Any, rows: int, seq: int) -> None:
    if mask is None:
        return
    ok = isinstance(mask, torch.Tensor) and tuple(mask.shape) in ((rows, seq), (rows, 1, seq))
    if not ok:
        raise ValueError(f"{where} must be ({rows}, {seq}) (1 = keep the token, 0 = padding; or diffusers' "
                         f"({rows}, 1, {seq}) additive bias), matching the text states, got {shape_of(mask)}")
    check_finite(where, mask.float() if not mask.is_floating_point() else mask)


def check_pixart_calibration(model: nn.Module, calibration: Any) -> None:
    """Check a `ConditionedCalibration` against a (unwrapped) ``PixArtTransformer2DModel``.

    Raises:
        TypeError: not a `ConditionedCalibration`, one without ``encoder_hidden_states`` (another
            family's keys, e.g. ``class_labels``), or integer text states.
        ValueError: latents of another channel count or not a multiple of the patch size; text
            states of another width, rows or NaN/inf; a mask of another shape; missing or
            superfluous ``added_cond_kwargs``; null conditions that do not fit.
    """
    from mosaicdiff.method.calibrate import ConditionedCalibration

    if not isinstance(calibration, ConditionedCalibration):
        raise TypeError(f"{_KIND}; got {type(calibration).__name__}")
    cond, n, cfg = calibration.conditions, len(calibration), model.config
    text = cond.get("encoder_hidden_states")
    if text is None:
        raise TypeError(f"{_KIND}; got conditions with keys {sorted(cond)}")
    width = int(cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim)
    where = "ConditionedCalibration.conditions"
    _check_text(f"{where}['encoder_hidden_states']", text, n, None, width)
    seq = int(text.shape[1])
    _check_mask(f"{where}['encoder_attention_mask']", cond.get("encoder_attention_mask"), n, seq)
    latents, p = calibration.latents, int(cfg.patch_size)
    if latents.shape[1] != int(cfg.in_channels) or latents.shape[2] % p or latents.shape[3] % p:
        raise ValueError(f"calibration latents are {tuple(latents.shape[1:])} (C, H, W); the model takes "
                         f"{cfg.in_channels} channels (config.in_channels) and H, W multiples of patch_size={p}")
    added = cond.get("added_cond_kwargs")
    given = {k for k, v in (added or {}).items() if v is not None} if isinstance(added, Mapping) else set()
    if model.use_additional_conditions:
        for key, cols in (("resolution", 2), ("aspect_ratio", 1)):
            value = added.get(key) if isinstance(added, Mapping) else None
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n, cols):
                what = "(height, width)" if cols == 2 else "height / width"
                raise ValueError(f"this PixArt uses additional conditions (use_additional_conditions, PixArt-alpha "
                                 f"1024): {where}['added_cond_kwargs'][{key!r}] must be ({n}, {cols}) (the pipeline's "
                                 f"{what} per latent), got {shape_of(value)}")
    elif given:
        raise ValueError(f"this PixArt takes no additional conditions (use_additional_conditions=False): leave "
                         f"{where}['added_cond_kwargs'] out or pass {{'resolution': None, 'aspect_ratio': None}}, got "
                         f"{sorted(given)}")
    nulls = calibration.null_conditions
    if nulls:
        null_where = "ConditionedCalibration.null_conditions"
        null_text = nulls.get("encoder_hidden_states")
        if null_text is not None:
            _check_text(f"{null_where}['encoder_hidden_states']", null_text, None, seq, width)
        null_mask = nulls.get("encoder_attention_mask")
        if null_mask is not None:
            _check_mask(f"{null_where}['encoder_attention_mask']", null_mask, int(null_mask.shape[0]), seq)

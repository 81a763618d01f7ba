"""What an SD3 is calibrated with: a `ConditionedCalibration` of latents and the pipeline's prompt
embeddings, checked against the model before any calibration pass.

``conditions``: ``encoder_hidden_states`` (``(N, S, joint_attention_dim)``: the pipeline's
``prompt_embeds``, CLIP-L/G and T5 states side by side) and ``pooled_projections``
(``(N, pooled_projection_dim)``: ``pooled_prompt_embeds``). ``null_conditions`` (the CFG branch): the
negative prompt's ``negative_prompt_embeds`` and ``negative_pooled_prompt_embeds``, one row for all
or one per latent. There is no default: SD3's unconditional input is the text encoders' embedding of
``""`` (the pooled CLIP embeddings are far from zero), which zeros would not reproduce.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mosaicdiff.method.conditioned_calibration import check_finite, shape_of

__all__ = ["NULL_CONDITIONS_NEEDED", "check_sd3_calibration"]

NULL_CONDITIONS_NEEDED = (
    "an SD3 calibration needs null_conditions for the classifier-free-guidance branch: the negative prompt's "
    "embeddings, e.g. ConditionedCalibration(latents, {'encoder_hidden_states': prompt_embeds, 'pooled_projections': "
    "pooled_prompt_embeds}, {'encoder_hidden_states': negative_prompt_embeds, 'pooled_projections': "
    "negative_pooled_prompt_embeds}) from pipe.encode_prompt(...) (SD3's null input is the embedding of \"\", not "
    "zeros); or cfg=False to calibrate without guidance")

_KIND = ("an SD3 is calibrated with ConditionedCalibration(latents, {'encoder_hidden_states': prompt_embeds, "
         "'pooled_projections': pooled_prompt_embeds}, null_conditions)")
_KEYS = ("encoder_hidden_states", "pooled_projections")




def _check(where: str, value: Any, rows: int | None, tail: tuple[int | None, ...], what: str, field: str) -> None:
    ok = isinstance(value, torch.Tensor) and value.dim() == 1 + len(tail) and (rows is None or value.shape[0] == rows)
    ok = ok and all(want is None or got == want for got, want in zip(value.shape[1:], tail))
    if not ok:
        dims = ", ".join(["N" if rows is None else str(rows)] + ["S" if d is None else str(d) for d in tail])
        raise ValueError(f"{where} must be ({dims}): {what} (config.{field}), got {shape_of(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{where} must be floating point, got {value.dtype}")
    check_finite(where, value)


def check_sd3_calibration(model: nn.Module, calibration: Any) -> None:
    """Check a `ConditionedCalibration` against an (unwrapped) ``SD3Transformer2DModel``.

    Raises:
        TypeError: not a `ConditionedCalibration`, one without the SD3 keys (another family's, e.g.
            ``class_labels``), or integer embeddings.
        ValueError: latents of another channel count or not a multiple of the patch size, or larger
            than the positional table; text states or pooled embeddings of another width, rows or
            NaN/inf; null conditions missing a key (their shapes and values `ConditionedCalibration`
            checks against the conditions).
    """
    from mosaicdiff.method.calibrate import ConditionedCalibration

    if not isinstance(calibration, ConditionedCalibration):
        raise TypeError(f"{_KIND}; got {type(calibration).__name__}")
    cond, n, cfg = calibration.conditions, len(calibration), model.config
    if any(cond.get(k) is None for k in _KEYS):
        raise TypeError(f"{_KIND}; got conditions with keys {sorted(cond)}")
    extra = sorted(set(cond) - set(_KEYS))
    if extra:
        raise ValueError(f"an SD3 calibration's conditions are {list(_KEYS)}; got also {extra} (the SD3 forward takes "
                         f"no other condition)")
    where, text_dim, pooled_dim = "ConditionedCalibration.conditions", int(cfg.joint_attention_dim), \
        int(cfg.pooled_projection_dim)
    _check(f"{where}['encoder_hidden_states']", cond["encoder_hidden_states"], n, (None, text_dim),
           "text states, one row per latent", "joint_attention_dim")
    _check(f"{where}['pooled_projections']", cond["pooled_projections"], n, (pooled_dim,),
           "pooled text embeddings, one row per latent", "pooled_projection_dim")
    latents, p = calibration.latents, int(cfg.patch_size)
    limit = int(cfg.pos_embed_max_size) * p if cfg.pos_embed_max_size else None
    if latents.shape[1] != int(cfg.in_channels) or latents.shape[2] % p or latents.shape[3] % p \
            or (limit is not None and max(latents.shape[2:]) > limit):
        raise ValueError(f"calibration latents are {tuple(latents.shape[1:])} (C, H, W); the model takes "
                         f"{cfg.in_channels} channels (config.in_channels) and H, W multiples of patch_size={p}"
                         + (f" up to {limit} (pos_embed_max_size * patch_size)" if limit else ""))
    nulls = calibration.null_conditions
    if nulls:
        null_where = "ConditionedCalibration.null_conditions"
        missing = [k for k in _KEYS if nulls.get(k) is None]
        if missing:
            raise ValueError(f"{null_where} lacks {missing}: SD3's null branch needs the negative prompt's "
                             f"negative_prompt_embeds and negative_pooled_prompt_embeds (both differ from the "
                             f"prompt's)")

"""Calibration data of text-conditioned U-Nets (Stable Diffusion 1.x/2.x, SDXL).

`TextCalibration` builds the `mosaicdiff.method.calibrate.ConditionedCalibration` of a
``UNet2DConditionModel`` from a pipeline's ``encode_prompt`` outputs: the conditions are the
U-Net's forward arguments, ``encoder_hidden_states`` (the prompt embeddings) and, for SDXL,
``added_cond_kwargs = {"text_embeds": pooled embeddings, "time_ids": size and crop
conditioning}``. The null (CFG) conditions are the negative prompt's embeddings; without them
zeros, which is what SDXL's pipeline uses for an empty negative prompt
(``force_zeros_for_empty_prompt``); the time ids are the same in both branches.
"""

from __future__ import annotations

import torch

from mosaicdiff.method.conditioned_calibration import ConditionedCalibration

__all__ = ["TextCalibration"]


def _rows(name: str, t: torch.Tensor | None, n: int, dims: int, allow_one: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] not in ((1, n) if allow_one else (n,)):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        rows = f"{n} (or 1)" if allow_one else f"{n}"
        raise ValueError(f"TextCalibration.{name} must be a {dims}-D tensor with {rows} rows (one per latent), "
                         f"got {shape}")
    if not t.is_floating_point():
        raise TypeError(f"TextCalibration.{name} must be floating point, got {t.dtype}")
    if t.device.type != "meta":
        bad = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1).nonzero().reshape(-1).tolist()
        if bad:  # else "hessian has non-finite entries" after the whole calibration pass
            raise ValueError(f"TextCalibration.{name} contains NaN/inf at row {bad[:8]} ({len(bad)} of "
                             f"{t.shape[0]} rows); drop or fix those prompts")
    return t.detach()


class TextCalibration(ConditionedCalibration):
    """Clean latents and their text conditioning (a `ConditionedCalibration` for U-Nets).

    Parameters:
        latents (`torch.Tensor` of shape `(N, C, H, W)`): VAE latents times the VAE scaling factor.
        prompt_embeds (`torch.Tensor` of shape `(N, S, T)`): the text encoder states of each prompt.
        pooled_prompt_embeds (`torch.Tensor` of shape `(N, P)`, *optional*): SDXL's pooled embeddings.
        add_time_ids (`torch.Tensor` of shape `(N, 6)` or `(1, 6)`, *optional*): SDXL's size and
            crop conditioning (original size, crop top-left, target size).
        negative_prompt_embeds (`(N or 1, S, T)`, *optional*): the null (CFG) prompt's states;
            default zeros.
        negative_pooled_prompt_embeds (`(N or 1, P)`, *optional*): its pooled embeddings; default zeros.

    The conditions are ``{"encoder_hidden_states": prompt_embeds}`` plus, for SDXL,
    ``"added_cond_kwargs": {"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids}``
    (one row of time ids expanded to every latent).

    Raises:
        ValueError: a wrong shape or a row count that differs from the latents' (each named),
            pooled embeddings without time ids or the reverse, or NaN/inf in the latents or in
            any of the embeddings and time ids (the argument and rows named).
        TypeError: non-float tensors.
    """

    def __init__(self, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled_prompt_embeds: torch.Tensor | None = None, add_time_ids: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None):
        x = latents
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TextCalibration.latents must be a non-empty (N, C, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"TextCalibration.latents must be floating point, got {x.dtype}")
        n = int(x.shape[0])
        prompt_embeds = _rows("prompt_embeds", prompt_embeds, n, 3)
        if prompt_embeds is None:
            raise ValueError("TextCalibration.prompt_embeds is required")
        pooled_prompt_embeds = _rows("pooled_prompt_embeds", pooled_prompt_embeds, n, 2)
        add_time_ids = _rows("add_time_ids", add_time_ids, n, 2, allow_one=True)
        if (pooled_prompt_embeds is None) != (add_time_ids is None):
            raise ValueError("TextCalibration: SDXL conditioning needs both pooled_prompt_embeds and add_time_ids "
                             "(or neither, for SD 1.x/2.x)")
        if add_time_ids is not None and add_time_ids.shape[1] != 6:
            raise ValueError(f"TextCalibration.add_time_ids must have 6 columns (original size, crop, target size), "
                             f"got {tuple(add_time_ids.shape)}")
        negative_prompt_embeds = _rows("negative_prompt_embeds", negative_prompt_embeds, n, 3, allow_one=True)
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(f"TextCalibration.negative_prompt_embeds must be shaped like prompt_embeds "
                             f"{tuple(prompt_embeds.shape[1:])} per row, got {tuple(negative_prompt_embeds.shape[1:])}")
        negative_pooled_prompt_embeds = _rows("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, n, 2,
                                              allow_one=True)
        if negative_pooled_prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("TextCalibration.negative_pooled_prompt_embeds given without pooled_prompt_embeds")
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.add_time_ids = add_time_ids
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative_pooled_prompt_embeds = negative_pooled_prompt_embeds

        def zeros(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, *like.shape[1:], dtype=like.dtype, device=like.device)

        conditions = {"encoder_hidden_states": prompt_embeds}
        nulls = {"encoder_hidden_states": zeros(prompt_embeds) if negative_prompt_embeds is None
                 else negative_prompt_embeds}
        if pooled_prompt_embeds is not None:
            time_ids = add_time_ids.expand(n, 6) if add_time_ids.shape[0] == 1 else add_time_ids
            conditions["added_cond_kwargs"] = {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}
            nulls["added_cond_kwargs"] = {"text_embeds": zeros(pooled_prompt_embeds)
                                          if negative_pooled_prompt_embeds is None
                                          else negative_pooled_prompt_embeds}  # time ids: the same
        super().__init__(latents, conditions, nulls, cfg=True)

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_prompt_embeds is not None

    def __repr__(self) -> str:
        parts = [f"latents={tuple(self.latents.shape)}", f"prompt_embeds={tuple(self.prompt_embeds.shape)}"]
        if self.is_sdxl:
            parts.append(f"pooled={tuple(self.pooled_prompt_embeds.shape)}")
        return f"TextCalibration({', '.join(parts)})"

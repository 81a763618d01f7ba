"""Calibration data of text-conditioned U-Nets (Stable Diffusion 1.x/2.x, SDXL).

`TextCalibration` plays the role `mosaicdiff.calibrate.Calibration` plays for class-conditional
DiTs: clean latents with their conditioning. A condition is a dict of batch-first tensors
(``prompt_embeds``; for SDXL also ``text_embeds`` = the pooled embeddings and ``time_ids``), so
`mosaicdiff.calibrate.stage_inputs` and `collect_hessians` handle it as they are. The null (CFG)
condition is the negative prompt's embeddings; without them it is zeros, which is what SDXL's
pipeline uses for an empty negative prompt (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TextCalibration"]

#: The condition keys, as the U-Net's forward takes them (the last two in ``added_cond_kwargs``).
CONDITION_KEYS = ("prompt_embeds", "text_embeds", "time_ids")


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
    return t.detach()


@dataclass
class TextCalibration:
    """Clean latents and their text conditioning.

    Parameters:
        latents (`torch.Tensor` of shape `(N, C, H, W)`): VAE latents times the VAE scaling factor.
        prompt_embeds (`torch.Tensor` of shape `(N, S, T)`): the text encoder states of each prompt.
        pooled_prompt_embeds (`torch.Tensor` of shape `(N, P)`, *optional*): SDXL's pooled embeddings.
        add_time_ids (`torch.Tensor` of shape `(N, 6)` or `(1, 6)`, *optional*): SDXL's size and
            crop conditioning (original size, crop top-left, target size).
        negative_prompt_embeds (`(N or 1, S, T)`, *optional*): the null (CFG) prompt's states;
            default zeros.
        negative_pooled_prompt_embeds (`(N or 1, P)`, *optional*): its pooled embeddings; default zeros.

    Raises:
        ValueError: a wrong shape or a row count that differs from the latents' (each named),
            pooled embeddings without time ids or the reverse, or NaN/inf in the latents.
        TypeError: non-float tensors.
    """

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self):
        x = self.latents
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TextCalibration.latents must be a non-empty (N, C, H, W) tensor, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"TextCalibration.latents must be floating point, got {x.dtype}")
        n = int(x.shape[0])
        self.prompt_embeds = _rows("prompt_embeds", self.prompt_embeds, n, 3)
        if self.prompt_embeds is None:
            raise ValueError("TextCalibration.prompt_embeds is required")
        self.pooled_prompt_embeds = _rows("pooled_prompt_embeds", self.pooled_prompt_embeds, n, 2)
        self.add_time_ids = _rows("add_time_ids", self.add_time_ids, n, 2, allow_one=True)
        if (self.pooled_prompt_embeds is None) != (self.add_time_ids is None):
            raise ValueError("TextCalibration: SDXL conditioning needs both pooled_prompt_embeds and add_time_ids "
                             "(or neither, for SD 1.x/2.x)")
        if self.add_time_ids is not None and self.add_time_ids.shape[1] != 6:
            raise ValueError(f"TextCalibration.add_time_ids must have 6 columns (original size, crop, target size), "
                             f"got {tuple(self.add_time_ids.shape)}")
        self.negative_prompt_embeds = _rows("negative_prompt_embeds", self.negative_prompt_embeds, n, 3,
                                            allow_one=True)
        if self.negative_prompt_embeds is not None and self.negative_prompt_embeds.shape[1:] != self.prompt_embeds.shape[1:]:
            raise ValueError(f"TextCalibration.negative_prompt_embeds must be shaped like prompt_embeds "
                             f"{tuple(self.prompt_embeds.shape[1:])} per row, got {tuple(self.negative_prompt_embeds.shape[1:])}")
        self.negative_pooled_prompt_embeds = _rows("negative_pooled_prompt_embeds",
                                                   self.negative_pooled_prompt_embeds, n, 2, allow_one=True)
        if self.negative_pooled_prompt_embeds is not None and self.pooled_prompt_embeds is None:
            raise ValueError("TextCalibration.negative_pooled_prompt_embeds given without pooled_prompt_embeds")
        if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
            raise ValueError("TextCalibration.latents contain NaN/inf; drop or fix those samples")

    # ------------------------------------------------------------------ what the calibration loop reads

    @property
    def x0(self) -> torch.Tensor:
        return self.latents

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_prompt_embeds is not None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def x0_sq_norm(self) -> float:
        """``r = ||x_0||^2 / d`` averaged over the samples (the closed form's data term)."""
        return float(self.latents.detach().to(torch.float64).pow(2).mean())

    def condition_rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of the samples `index`, with their null counterparts under ``null_*``."""
        n = int(index.numel())

        def pick(t: torch.Tensor | None, default_like: torch.Tensor | None = None):
            if t is None:
                return torch.zeros_like(default_like[index]) if default_like is not None else None
            return t.expand(len(self), *t.shape[1:])[index] if t.shape[0] == 1 else t[index]

        out = {"prompt_embeds": pick(self.prompt_embeds),
               "null_prompt_embeds": pick(self.negative_prompt_embeds, self.prompt_embeds)}
        if self.is_sdxl:
            out["text_embeds"] = pick(self.pooled_prompt_embeds)
            out["null_text_embeds"] = pick(self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds)
            out["time_ids"] = pick(self.add_time_ids)
            out["null_time_ids"] = out["time_ids"]
        assert all(v.shape[0] == n for v in out.values())
        return out

    def null_condition(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CFG branch of `condition`: the negative (null) embeddings in place of the prompt's."""
        return {**condition, **{k: condition[f"null_{k}"] for k in CONDITION_KEYS if k in condition}}

    def __repr__(self) -> str:
        parts = [f"latents={tuple(self.latents.shape)}", f"prompt_embeds={tuple(self.prompt_embeds.shape)}"]
        if self.is_sdxl:
            parts.append(f"pooled={tuple(self.pooled_prompt_embeds.shape)}")
        return f"TextCalibration({', '.join(parts)})"

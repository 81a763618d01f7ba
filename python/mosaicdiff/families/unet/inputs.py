"""The checks of a `MosaicUNet` forward's inputs: shapes only (no host read of device values).

diffusers' ``UNet2DConditionModel`` finds a wrong text width or batch as a matmul shape error deep
inside its attention, and missing SDXL conditions as a ``TypeError`` on ``None``; here each is one
line naming the argument, what the U-Net takes and what it got.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_forward_inputs"]

_WHO = "MosaicUNet.forward"


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_forward_inputs(model, sample: Any, timestep: Any, encoder_hidden_states: Any, added: Any) -> None:
    """`sample` (B, C, H, W), `timestep` a number or a 0-d / (1,) / (B,) tensor, the text states
    (B, S, T) with T the blocks' text width, and for an SDXL-style U-Net (``addition_embed_type``
    ``"text_time"``) ``added_cond_kwargs`` with ``text_embeds`` (B, P) and ``time_ids`` (B, 6).

    Raises:
        ValueError: naming the argument, the expected and the given shape.
        TypeError: an argument that is not a tensor (or a dict, for ``added_cond_kwargs``).
    """
    cfg = model.config
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        raise ValueError(f"{_WHO}: sample must be a (B, C, H, W) tensor, got {_shape(sample)}")
    batch = int(sample.shape[0])
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 1:
        raise ValueError(f"{_WHO}: timestep must be a number, a 0-d tensor or a ({batch},) tensor, got shape "
                         f"{tuple(timestep.shape)}")
    if not isinstance(encoder_hidden_states, torch.Tensor):
        raise TypeError(f"{_WHO}: encoder_hidden_states (the text states, (B, S, T)) must be a tensor, got "
                        f"{_shape(encoder_hidden_states)}")
    widths = {text for _, _, text in model._block_facts}
    text = encoder_hidden_states
    if text.dim() != 3 or text.shape[0] != batch or (len(widths) == 1 and text.shape[-1] not in widths):
        want = next(iter(widths)) if len(widths) == 1 else "T"
        raise ValueError(f"{_WHO}: encoder_hidden_states must be ({batch}, S, {want}): one row of text states per "
                         f"sample, {want} wide (config.cross_attention_dim), got {tuple(text.shape)}")
    if cfg.get("addition_embed_type") != "text_time":
        return
    pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
    if not isinstance(added, Mapping) or not {"text_embeds", "time_ids"} <= set(added):
        got = sorted(added) if isinstance(added, Mapping) else _shape(added)
        raise TypeError(f"{_WHO}: this U-Net is SDXL-style (addition_embed_type='text_time'): pass "
                        f"added_cond_kwargs={{'text_embeds': ({batch}, {pooled}), 'time_ids': ({batch}, 6)}}, "
                        f"got {got}")
    for key, cols in (("text_embeds", pooled), ("time_ids", 6)):
        value = added[key]
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape != (batch, cols):
            raise ValueError(f"{_WHO}: added_cond_kwargs[{key!r}] must be ({batch}, {cols}), got {_shape(value)}")

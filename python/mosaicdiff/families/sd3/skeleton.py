r"""What every stage of an SD3 mosaic shares: the patch embedding, the timestep + pooled-text embedding,
the caption projection, every block's modulation linears as one matrix, and the final layer.

Every block's ``norm1.linear`` and ``norm1_context.linear`` and the final ``norm_out.linear`` read the
same ``silu(temb)``, and pruning leaves them whole, so `SD3Skeleton` stacks their rows into one
``(R, C)`` matrix: one GEMM per forward gives every modulation (`SD3Skeleton.modulations`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosaicdiff.core.adapter import unwrap_model
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.sd3.blocks import BlockKind, block_kind

__all__ = ["SD3Skeleton", "block_kinds", "modulation_chunks", "skeleton_from_config", "skeleton_from_dense"]


def modulation_chunks(kind: BlockKind) -> tuple[int, int]:
    """``(image, text)`` modulation chunks of a block: 6 or 9 (dual attention); 6 or 2 (context_pre_only:
    ``AdaLayerNormContinuous``'s scale and shift)."""
    return (9 if kind.dual_attention else 6), (2 if kind.context_pre_only else 6)


def block_kinds(config: Mapping[str, Any]) -> list[BlockKind]:
    """Every block's `BlockKind` from an ``SD3Transformer2DModel`` config (as diffusers builds them)."""
    layers, dual = int(config["num_layers"]), set(config.get("dual_attention_layers") or ())
    return [block_kind(i == layers - 1, i in dual, config.get("qk_norm") is not None) for i in range(layers)]


class SD3Skeleton(nn.Module):
    r"""The un-pruned parameters of an SD3 transformer, stored once and shared by every stage.

    Parameters:
        pos_embed (`nn.Module`): diffusers' ``PatchEmbed`` (cropped sin-cos positions).
        time_text_embed (`nn.Module`): ``CombinedTimestepTextProjEmbeddings`` (timestep + pooled text -> temb).
        context_embedder (`nn.Linear`): joint_attention_dim -> C.
        kinds (`list[BlockKind]`): every block's kind (sets the modulation rows).
        mod_weight (`torch.Tensor` of shape `(R, C)`), mod_bias (`(R,)`): per block its ``norm1.linear`` then
            its ``norm1_context.linear`` rows, then ``norm_out.linear``'s (scale, shift).
        proj_out (`nn.Linear`): the final projection.
        norm_out_eps (`float`): the final LayerNorm's epsilon (1e-6).
    """

    def __init__(self, pos_embed: nn.Module, time_text_embed: nn.Module, context_embedder: nn.Linear,
                 kinds: Sequence[BlockKind], mod_weight: torch.Tensor, mod_bias: torch.Tensor, proj_out: nn.Linear,
                 norm_out_eps: float = 1e-6):
        super().__init__()
        self.pos_embed, self.time_text_embed, self.context_embedder = pos_embed, time_text_embed, context_embedder
        self.kinds = [block_kind(*k) for k in kinds]
        C = int(mod_weight.shape[1])
        self.width = C
        self.offsets, start = [], 0
        for kind in self.kinds:  # (image offset, chunks, text offset, chunks) in rows
            ni, nt = modulation_chunks(kind)
            self.offsets.append((start, ni, start + ni * C, nt))
            start += (ni + nt) * C
        self.final_offset = start
        if tuple(mod_weight.shape) != (start + 2 * C, C) or tuple(mod_bias.shape) != (start + 2 * C,):
            raise ValueError(f"SD3Skeleton: the modulation matrix of these {len(self.kinds)} blocks must be "
                             f"({start + 2 * C}, {C}) + ({start + 2 * C},), got {tuple(mod_weight.shape)} + "
                             f"{tuple(mod_bias.shape)}")
        self.mod_weight, self.mod_bias = frozen(mod_weight), frozen(mod_bias)
        self.proj_out = proj_out
        self.norm_out_eps = float(norm_out_eps)
        for p in self.parameters():
            p.requires_grad_(False)

    def modulations(self, temb: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Every block's ``(mod, cmod)`` (``(B, chunks, C)`` views, unit stride in C) and the final
        layer's ``(B, 2, C)`` (scale, shift), from one GEMM."""
        m = F.linear(F.silu(temb), self.mod_weight, self.mod_bias)  # (B, R)
        C = self.width

        def chunks(start: int, n: int) -> torch.Tensor:
            return m[:, start:start + n * C].unflatten(1, (n, C))

        mods = [(chunks(a, na), chunks(b, nb)) for a, na, b, nb in self.offsets]
        return mods, chunks(self.final_offset, 2)

    def extra_repr(self) -> str:
        return f"blocks={len(self.kinds)}, width={self.width}, modulation_rows={self.final_offset + 2 * self.width}"


def skeleton_from_dense(dense: nn.Module) -> SD3Skeleton:
    """Copy the un-pruned modules of a dense SD3 (its blocks' modulation linears stacked) into an `SD3Skeleton`."""
    inner = unwrap_model(dense)
    kinds = block_kinds(inner.config)
    linears = [m for b in inner.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
    linears.append(inner.norm_out.linear)
    weight = torch.cat([lin.weight.detach() for lin in linears]).clone()
    bias = torch.cat([lin.bias.detach() for lin in linears]).clone()
    return SD3Skeleton(copy.deepcopy(inner.pos_embed), copy.deepcopy(inner.time_text_embed),
                       copy.deepcopy(inner.context_embedder), kinds, weight, bias, copy.deepcopy(inner.proj_out),
                       inner.norm_out.norm.eps)


def skeleton_from_config(config: Mapping[str, Any]) -> tuple[SD3Skeleton, dict[str, Any]]:
    """An uninitialised skeleton and the block facts of the SD3 a config describes.

    diffusers' model is built with a single block (under a forked RNG: the caller's random state is
    untouched), so the patch embedding (its positions included) and the embedders are exactly diffusers'.
    """
    from diffusers import SD3Transformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    kinds = block_kinds(cfg)
    with torch.random.fork_rng(devices=[]):
        model = SD3Transformer2DModel.from_config({**cfg, "num_layers": 1, "dual_attention_layers": ()})
    C, hd = int(model.inner_dim), int(cfg["attention_head_dim"])
    block = model.transformer_blocks[0]
    facts = {"num_layers": len(kinds), "kinds": kinds, "width": C, "head_dim": hd,
             "heads": int(cfg["num_attention_heads"]), "mlp_hidden": int(block.ff.net[2].in_features),
             "context_mlp_hidden": int(block.ff.net[2].in_features), "eps": 1e-6, "qk_eps": 1e-6}
    rows = sum(sum(modulation_chunks(k)) for k in kinds) * C + 2 * C
    skeleton = SD3Skeleton(model.pos_embed, model.time_text_embed, model.context_embedder, kinds,
                           torch.empty(rows, C), torch.empty(rows), model.proj_out, model.norm_out.norm.eps)
    return skeleton, facts

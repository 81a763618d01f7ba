r"""The PixArt adapter: diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha, PixArt-Sigma) as the method
and the runtime see it.

A PixArt block is a ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: self-attention,
cross-attention to the (caption-projected) T5 text states with their mask, and a tanh-GELU MLP,
modulated by one ``adaln_single`` output for the whole model plus a learned ``scale_shift_table``
per block. Per block three groups of units:

- ``attn1`` (self-attention heads): rows of ``to_q/to_k/to_v``, ``head_dim`` columns of ``to_out[0]``;
- ``attn2`` (cross-attention heads): rows of ``to_q`` and of the text-side ``to_k/to_v``,
  ``head_dim`` columns of ``to_out[0]``;
- ``ff`` (MLP channels): rows of ``ff.net[0].proj``, columns of ``ff.net[2]``.

The consumers (``to_out[0]``, ``ff.net[2]``) are compensated by OBS on Hessians of their inputs,
collected on calibration latents with their text states and mask (`ConditionedCalibration`, both
CFG branches: the null branch is the negative prompt's embedding, which users pass).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, PrunedGroup, unwrap_model
from mosaicdiff.core.stages import frozen
from mosaicdiff.core.text_blocks import compact_text_fields, text_block_widths
from mosaicdiff.families.pixart.blocks import CompactPixArtBlockWeights

__all__ = ["PIXART", "PIXART_CONFIG_KEYS", "PixArtAdapter", "PixArtSkeleton", "block_facts", "check_pixart",
           "skeleton_from_config", "skeleton_from_dense"]

#: The ``PixArtTransformer2DModel`` config keys (a mosaic repeats them: pipelines read ``sample_size``,
#: ``in_channels``, ``out_channels``).
PIXART_CONFIG_KEYS = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
    "norm_num_groups", "cross_attention_dim", "attention_bias", "sample_size", "patch_size", "activation_fn",
    "num_embeds_ada_norm", "upcast_attention", "norm_type", "norm_elementwise_affine", "norm_eps",
    "interpolation_scale", "use_additional_conditions", "caption_channels", "attention_type",
)


def check_pixart(model: nn.Module) -> None:
    """Refuse, in one line, PixArt variants the compact block does not compute.

    Accepted: ``BasicTransformerBlock``\\ s with ``norm_type="ada_norm_single"``, a non-affine
    norm1/norm2, self-attention then cross-attention to text states, a tanh-GELU MLP, attention
    without qk-norm, residual connection, rescaling or another scale than ``head_dim ** -0.5``.

    Raises:
        ValueError: naming the block and what it uses.
    """
    from diffusers.models.activations import GELU
    from diffusers.models.attention import BasicTransformerBlock

    inner = unwrap_model(model)
    blocks = getattr(inner, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"expected a PixArtTransformer2DModel with a non-empty transformer_blocks, got "
                         f"{type(inner).__name__}")
    for i, b in enumerate(blocks):
        what = None
        if not isinstance(b, BasicTransformerBlock):
            what = f"a {type(b).__name__}, not a BasicTransformerBlock"
        elif b.norm_type != "ada_norm_single":
            what = f"norm_type={b.norm_type!r} (only 'ada_norm_single' is supported)"
        elif getattr(b.norm1, "weight", None) is not None or getattr(b.norm2, "weight", None) is not None:
            what = "affine norms (norm_elementwise_affine=True)"
        elif b.attn2 is None or b.only_cross_attention or b.double_self_attention or not b.attn2.is_cross_attention:
            what = "no cross-attention to text states (cross_attention_dim=None or double self-attention)"
        elif b.pos_embed is not None or hasattr(b, "fuser"):
            what = "per-block positional embeddings or a gated (GLIGEN) fuser"
        elif not isinstance(b.ff.net[0], GELU) or b.ff.net[0].approximate != "tanh":
            act = b.ff.net[0]
            what = (f"a {type(act).__name__}(approximate={getattr(act, 'approximate', None)!r}) MLP (only tanh-GELU, "
                    f"activation_fn='gelu-approximate', is supported)")
        else:
            for name in ("attn1", "attn2"):
                attn = getattr(b, name)
                hd = attn.inner_dim // attn.heads
                if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
                    what = f"qk-norm in {name}"
                elif attn.residual_connection or attn.rescale_output_factor != 1.0 or attn.norm_cross is not None \
                        or attn.group_norm is not None or attn.spatial_norm is not None:
                    what = f"an {name} with residual/rescale/norm options"
                elif not math.isclose(float(attn.scale), hd ** -0.5, rel_tol=1e-6):
                    what = f"an {name} scale {attn.scale} != head_dim ** -0.5"
        if what:
            raise ValueError(f"transformer_blocks[{i}] of {type(inner).__name__} uses {what}, which MosaicPixArt does "
                             f"not compute")


def block_facts(block: nn.Module) -> dict[str, Any]:
    """``head_dim``, ``heads``, ``width``, ``text_width``, ``mlp_hidden`` and ``eps`` of a PixArt block."""
    attn1 = block.attn1
    return {"head_dim": attn1.inner_dim // attn1.heads, "heads": int(attn1.heads), "width": int(attn1.to_q.in_features),
            "text_width": int(block.attn2.to_k.in_features), "mlp_hidden": int(block.ff.net[2].in_features),
            "eps": float(block.norm1.eps)}


class PixArtSkeleton(nn.Module):
    r"""The un-pruned parameters of a PixArt transformer, stored once and shared by every stage.

    Parameters:
        pos_embed (`nn.Module`): diffusers' ``PatchEmbed``.
        adaln_single (`nn.Module`): the ``AdaLayerNormSingle`` (timestep and, for PixArt-alpha 1024,
            resolution / aspect-ratio embeddings; one ``(6C,)`` modulation for every block).
        caption_projection (`nn.Module` or None): ``PixArtAlphaTextProjection`` (T5 width -> C).
        block_tables (`torch.Tensor` of shape `(L, 6, C)`): every block's ``scale_shift_table``.
        scale_shift_table (`torch.Tensor` of shape `(2, C)`): the final layer's.
        proj_out (`nn.Linear`): the final projection.
        norm_out_eps (`float`): the final LayerNorm's epsilon (1e-6 in diffusers).
    """

    def __init__(self, pos_embed: nn.Module, adaln_single: nn.Module, caption_projection: nn.Module | None,
                 block_tables: torch.Tensor, scale_shift_table: torch.Tensor, proj_out: nn.Linear,
                 norm_out_eps: float = 1e-6):
        super().__init__()
        self.pos_embed, self.adaln_single, self.caption_projection = pos_embed, adaln_single, caption_projection
        self.block_tables = frozen(block_tables)
        self.scale_shift_table = frozen(scale_shift_table)
        self.proj_out = proj_out
        self.norm_out_eps = float(norm_out_eps)
        for p in self.parameters():
            p.requires_grad_(False)


def skeleton_from_dense(dense: nn.Module) -> PixArtSkeleton:
    """Copy the un-pruned modules of a dense PixArt (its blocks not at all) into a `PixArtSkeleton`."""
    inner = unwrap_model(dense)
    tables = torch.stack([b.scale_shift_table.detach() for b in inner.transformer_blocks]).clone()
    return PixArtSkeleton(copy.deepcopy(inner.pos_embed), copy.deepcopy(inner.adaln_single),
                          copy.deepcopy(inner.caption_projection), tables,
                          inner.scale_shift_table.detach().clone(), copy.deepcopy(inner.proj_out), inner.norm_out.eps)


def skeleton_from_config(config: Mapping[str, Any]) -> tuple[PixArtSkeleton, dict[str, Any]]:
    """An uninitialised skeleton and the block facts of the PixArt a config describes.

    diffusers' model is built with a single block (under a forked RNG: the caller's random state is
    untouched), so the patch embedding (its sin-cos positions included), the embedders and the
    block facts are exactly diffusers'.
    """
    from diffusers import PixArtTransformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    layers = int(cfg["num_layers"])
    with torch.random.fork_rng(devices=[]):
        model = PixArtTransformer2DModel.from_config({**cfg, "num_layers": 1})
    facts = {"num_layers": layers, **block_facts(model.transformer_blocks[0])}
    skeleton = PixArtSkeleton(model.pos_embed, model.adaln_single, model.caption_projection,
                              torch.empty(layers, 6, facts["width"]), model.scale_shift_table.detach(), model.proj_out,
                              model.norm_out.eps)
    return skeleton, facts


class PixArtAdapter(ModelAdapter):
    """diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha / Sigma); pruned into `MosaicPixArt`."""

    name = "PixArt"

    def handles(self, model: nn.Module) -> bool:
        from diffusers import PixArtTransformer2DModel

        return isinstance(model, PixArtTransformer2DModel)

    def validate(self, model: nn.Module) -> None:
        check_pixart(model)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return unwrap_model(model).transformer_blocks

    def groups(self, block: nn.Module) -> Mapping[str, PrunableGroup]:
        def heads(attn) -> PrunableGroup:
            head_dim = attn.inner_dim // attn.heads
            return PrunableGroup("heads", attn.to_out[0], (attn.to_q, attn.to_k, attn.to_v), head_dim)

        return {"attn1": heads(block.attn1), "attn2": heads(block.attn2),
                "ff": PrunableGroup("channels", block.ff.net[2], (block.ff.net[0].proj,), 1)}

    # run: the default, ``model(hidden_states=x_t, timestep=t, encoder_hidden_states=..., ...)``

    def check_calibration(self, model: nn.Module, calibration: Any) -> None:
        """Text states (one ``(S, caption_channels)`` row per latent, finite), their mask, the
        additional conditions exactly when the model takes them, latents it can run.

        Raises:
            TypeError: not a `ConditionedCalibration`, or one without ``encoder_hidden_states``.
            ValueError: the data does not fit this model (each mismatch named).
        """
        from mosaicdiff.families.pixart.calibration import check_pixart_calibration

        check_pixart_calibration(unwrap_model(model), calibration)

    def default_null_conditions(self, model: nn.Module, calibration: Any) -> Mapping[str, Any] | None:
        """None of its own: PixArt's unconditional branch is the T5 embedding of the negative prompt
        (``""``), not zeros, so the calibration must carry it (see `check_pixart_calibration`)."""
        from mosaicdiff.families.pixart.calibration import NULL_CONDITIONS_NEEDED

        raise ValueError(NULL_CONDITIONS_NEEDED)

    def dense_block(self, block: nn.Module) -> CompactPixArtBlockWeights:
        from mosaicdiff.method import compact

        return self.compact_block(block, compact.prune_groups(self.groups(block), None, 0.0, method="magnitude",
                                                              align=None))

    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> CompactPixArtBlockWeights:
        return CompactPixArtBlockWeights(**compact_text_fields(pruned))

    def block_widths(self, block: nn.Module, weights: CompactPixArtBlockWeights) -> dict[str, float]:
        return text_block_widths(block, weights)

    def shared_skeleton(self, model: nn.Module) -> PixArtSkeleton:
        return skeleton_from_dense(model)

    def default_scheduler(self):
        """PixArt's sampler: DPM-Solver++ (2nd order) on its training schedule, linear betas
        0.0001..0.02 over 1000 steps (the PixArt-alpha/Sigma pipelines' scheduler config)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                           beta_schedule="linear")


#: The PixArt adapter (stateless: one instance serves every PixArt transformer).
PIXART = PixArtAdapter()

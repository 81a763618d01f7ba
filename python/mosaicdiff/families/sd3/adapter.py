r"""The SD3 adapter: diffusers' ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) as the method and the
runtime see it.

An SD3 block is a ``JointTransformerBlock`` (MMDiT): an image stream and a text stream, each with its
own adaLN-Zero modulation, q/k/v and MLP, attending jointly over ``[image | text]``. SD3.5 normalises
q and k per head (``qk_norm="rms_norm"``); SD3.5-Medium's first blocks (``dual_attention_layers``)
add a second self-attention of the image stream (``attn2``); the last block is ``context_pre_only``
(the text stream's attention output is discarded: no ``to_add_out``, no ``ff_context``). Per block:

- ``attn`` (joint heads): rows of ``to_q/to_k/to_v`` and ``add_q_proj/add_k_proj/add_v_proj``,
  ``head_dim`` columns of ``to_out[0]`` and of ``to_add_out`` (`PrunableGroup.more_consumers`: a
  head's OBS cost is the sum over both streams, each compensated with its own Hessian);
- ``attn2`` (dual-attention blocks): rows of ``attn2.to_q/k/v``, columns of ``attn2.to_out[0]``;
- ``ff`` and ``ff_context`` (MLP channels): rows of ``net[0].proj``, columns of ``net[2]``.

The q/k RMSNorm weights (``(head_dim,)``, shared by every head) and the modulation linears are not
pruned. Calibration: `ConditionedCalibration` with ``encoder_hidden_states`` and
``pooled_projections``, the null branch the negative prompt's embeddings
(`mosaicdiff.families.sd3.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mosaicdiff.core.adapter import (
    ModelAdapter,
    PrunableGroup,
    PrunedGroup,
    unwrap_model,
)
from mosaicdiff.families.sd3.blocks import CompactSD3BlockWeights, block_kind

__all__ = ["SD3", "SD3_CONFIG_KEYS", "SD3Adapter", "block_facts", "check_sd3", "sd3_groups"]

#: The ``SD3Transformer2DModel`` config keys (a mosaic repeats them: pipelines read ``sample_size``,
#: ``patch_size``, ``in_channels``).
SD3_CONFIG_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                   "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                   "out_channels", "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def _attention_problem(attn: nn.Module, name: str, qk_norm: bool) -> str | None:
    """What of a joint / self attention the compact block does not compute, or None."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.normalization import RMSNorm

    hd = attn.inner_dim // attn.heads
    if type(attn.processor) is not JointAttnProcessor2_0:
        return f"{name} with a {type(attn.processor).__name__} (only JointAttnProcessor2_0: no fused qkv, IP-Adapter, PAG)"
    if attn.residual_connection or attn.rescale_output_factor != 1.0 or attn.group_norm is not None \
            or attn.spatial_norm is not None or attn.norm_cross is not None:
        return f"an {name} with residual/rescale/norm options"
    if not math.isclose(float(attn.scale), hd ** -0.5, rel_tol=1e-6):
        return f"an {name} scale {attn.scale} != head_dim ** -0.5"
    norms = [n for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") if hasattr(attn, n)]
    present = [n for n in norms if getattr(attn, n) is not None]
    if not qk_norm and present:
        return f"qk-norm in {name} ({present}) with the model's qk_norm=None"
    if qk_norm:
        wanted = ["norm_q", "norm_k"] + (["norm_added_q", "norm_added_k"] if attn.added_kv_proj_dim else [])
        for n in wanted:
            norm = getattr(attn, n, None)
            if type(norm) is not RMSNorm or norm.bias is not None or tuple(norm.dim) != (hd,):
                return f"{name}.{n} = {type(norm).__name__} (only a per-head diffusers RMSNorm, qk_norm='rms_norm')"
    return None


def _norm_problem(block: nn.Module) -> str | None:
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        SD35AdaLayerNormZeroX,
    )

    want1 = SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero
    if type(block.norm1) is not want1 or getattr(block.norm1, "emb", None) is not None:
        return f"norm1 = {type(block.norm1).__name__} (expected {want1.__name__} on temb)"
    want_c = AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero
    if type(block.norm1_context) is not want_c:
        return f"norm1_context = {type(block.norm1_context).__name__} (expected {want_c.__name__})"
    lns = [block.norm1.norm, block.norm2, block.norm1_context.norm]
    if not block.context_pre_only:
        lns.append(block.norm2_context)
    for ln in lns:
        if not isinstance(ln, nn.LayerNorm) or ln.weight is not None or float(ln.eps) != 1e-6:
            return f"a {type(ln).__name__} that is not a non-affine LayerNorm with eps 1e-6"
    return None


def _ff_problem(ff: nn.Module, name: str) -> str | None:
    from diffusers.models.activations import GELU

    act = ff.net[0]
    if not isinstance(act, GELU) or act.approximate != "tanh" or not isinstance(ff.net[2], nn.Linear):
        return (f"a {type(act).__name__}(approximate={getattr(act, 'approximate', None)!r}) {name} (only the "
                f"tanh-GELU FeedForward)")
    return None


def check_sd3(model: nn.Module) -> None:
    """Refuse, in one line, SD3 variants the compact block does not compute.

    Accepted: ``JointTransformerBlock``\\ s with ``JointAttnProcessor2_0`` (the default: not the fused
    projections, IP-Adapter or PAG processors), non-affine LayerNorms, the default attention scale,
    q/k norm absent or per-head ``RMSNorm``, tanh-GELU MLPs, ``context_pre_only`` on the last block
    only, the caption projection as wide as the blocks.

    Raises:
        ValueError: naming the block and what it uses.
    """
    from diffusers.models.attention import JointTransformerBlock

    inner = unwrap_model(model)
    blocks = getattr(inner, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"expected an SD3Transformer2DModel with a non-empty transformer_blocks, got "
                         f"{type(inner).__name__}")
    qk_norm = inner.config.qk_norm is not None
    for i, b in enumerate(blocks):
        what = None
        if not isinstance(b, JointTransformerBlock):
            what = f"a {type(b).__name__}, not a JointTransformerBlock"
        elif b.context_pre_only != (i == len(blocks) - 1):
            what = f"context_pre_only={b.context_pre_only} (only the last block may drop the text stream)"
        else:
            what = _norm_problem(b) or _attention_problem(b.attn, "attn", qk_norm) or _ff_problem(b.ff, "ff")
            if what is None and b.use_dual_attention:
                what = _attention_problem(b.attn2, "attn2", qk_norm)
            if what is None and not b.context_pre_only:
                what = _ff_problem(b.ff_context, "ff_context")
        if what:
            raise ValueError(f"transformer_blocks[{i}] of {type(inner).__name__} uses {what}, which MosaicSD3 does "
                             f"not compute")
    width = int(blocks[0].attn.to_q.in_features)
    if int(inner.context_embedder.out_features) != width:
        raise ValueError(f"{type(inner).__name__}: caption_projection_dim={inner.context_embedder.out_features} must "
                         f"equal the block width {width} (num_attention_heads * attention_head_dim)")


def block_facts(block: nn.Module) -> dict[str, Any]:
    """``head_dim``, ``heads``, ``width``, ``mlp_hidden``, ``context_mlp_hidden`` (0 in the last block),
    ``kind`` (`block_kind`) and ``qk_eps`` of an SD3 block."""
    attn = block.attn
    norm = getattr(attn, "norm_q", None)
    return {"head_dim": attn.inner_dim // attn.heads, "heads": int(attn.heads), "width": int(attn.to_q.in_features),
            "mlp_hidden": int(block.ff.net[2].in_features),
            "context_mlp_hidden": 0 if block.context_pre_only else int(block.ff_context.net[2].in_features),
            "kind": block_kind(bool(block.context_pre_only), bool(block.use_dual_attention), norm is not None),
            "qk_eps": float(norm.eps) if norm is not None else 1e-6}


def sd3_groups(block: nn.Module) -> dict[str, PrunableGroup]:
    """The prunable groups of an SD3 block by name (see the module docstring)."""
    attn = block.attn
    hd = attn.inner_dim // attn.heads
    producers = (attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    more = () if block.context_pre_only else (attn.to_add_out,)  # a pre-only block discards the text output
    groups = {"attn": PrunableGroup("heads", attn.to_out[0], producers, hd, more_consumers=more)}
    if block.use_dual_attention:
        a2 = block.attn2
        groups["attn2"] = PrunableGroup("heads", a2.to_out[0], (a2.to_q, a2.to_k, a2.to_v), a2.inner_dim // a2.heads)
    groups["ff"] = PrunableGroup("channels", block.ff.net[2], (block.ff.net[0].proj,), 1)
    if not block.context_pre_only:
        groups["ff_context"] = PrunableGroup("channels", block.ff_context.net[2], (block.ff_context.net[0].proj,), 1)
    return groups


class SD3Adapter(ModelAdapter):
    """diffusers' ``SD3Transformer2DModel`` (SD3, SD3.5); pruned into `MosaicSD3`."""

    name = "SD3"

    def handles(self, model: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(model, SD3Transformer2DModel)

    def validate(self, model: nn.Module) -> None:
        check_sd3(model)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return unwrap_model(model).transformer_blocks

    def groups(self, block: nn.Module) -> Mapping[str, PrunableGroup]:
        return sd3_groups(block)

    # run: the default, ``model(hidden_states=x_t, timestep=t, encoder_hidden_states=..., pooled_projections=...)``

    def check_calibration(self, model: nn.Module, calibration: Any) -> None:
        """Text states ``(N, S, joint_attention_dim)`` and pooled embeddings ``(N, pooled_projection_dim)``,
        finite, the null branch's both, latents the model can run.

        Raises:
            TypeError: not a `ConditionedCalibration`, or one without the SD3 keys.
            ValueError: the data does not fit this model (each mismatch named).
        """
        from mosaicdiff.families.sd3.calibration import check_sd3_calibration

        check_sd3_calibration(unwrap_model(model), calibration)

    def default_null_conditions(self, model: nn.Module, calibration: Any) -> Mapping[str, Any] | None:
        """None of its own: SD3's unconditional branch is the text encoders' embedding of the negative
        prompt, not zeros, so the calibration must carry it."""
        from mosaicdiff.families.sd3.calibration import NULL_CONDITIONS_NEEDED

        raise ValueError(NULL_CONDITIONS_NEEDED)

    def dense_block(self, block: nn.Module) -> CompactSD3BlockWeights:
        from mosaicdiff.method import compact

        return self.compact_block(block, compact.prune_groups(self.groups(block), None, 0.0, method="magnitude",
                                                              align=None))

    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> CompactSD3BlockWeights:
        from mosaicdiff.families.sd3.blocks import compact_fields

        return compact_fields(block, pruned)

    def block_widths(self, block: nn.Module, weights: CompactSD3BlockWeights) -> dict[str, float]:
        facts = block_facts(block)
        heads, mlp = int(weights.kept_heads.numel()), int(weights.kept_channels.numel())
        return {"heads": heads, "mlp": mlp, "head_sparsity": 1 - heads / facts["heads"],
                "mlp_sparsity": 1 - mlp / facts["mlp_hidden"]}

    def shared_skeleton(self, model: nn.Module) -> nn.Module:
        from mosaicdiff.families.sd3.skeleton import skeleton_from_dense

        return skeleton_from_dense(model)

    def default_scheduler(self):
        """SD3's sampler: flow-matching Euler with ``shift=3.0`` (the SD3 / SD3.5 pipelines' scheduler config)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


#: The SD3 adapter (stateless: one instance serves every SD3 transformer).
SD3 = SD3Adapter()

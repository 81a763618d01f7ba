r"""The Flux adapter: diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev / schnell) as the method and the
runtime see it.

A Flux transformer runs ``num_layers`` double-stream blocks (``FluxTransformerBlock``: the image and
the text stream each with its own AdaLayerNormZero modulation, q/k/v and MLP, joined in one
attention over ``[text | image]`` with per-head RMSNorm on q and k and RoPE) and then
``num_single_layers`` single-stream blocks (``FluxSingleTransformerBlock``: one stream, attention
and a tanh-GELU MLP reading the same modulated norm, ``proj_out`` reading ``[attention | MLP]``).
Per block the groups of units:

- double block: ``attn`` (heads: rows of ``to_q/k/v`` and ``add_q/k/v_proj``; ``head_dim``
  columns of two consumers, ``to_out[0]`` (image tokens) and ``to_add_out`` (text tokens), each
  compensated with its own Hessian), ``ff`` and ``ff_context`` (MLP channels of each stream);
- single block: ``attn`` (heads: rows of ``to_q/k/v``, columns ``[0, inner_dim)`` of ``proj_out``)
  and ``mlp`` (channels: rows of ``proj_mlp``, columns ``[inner_dim, inner_dim + mlp_hidden)`` of
  the same ``proj_out``): both groups are pruned on one compensated ``proj_out``.

The q/k RMSNorm weights are per ``head_dim`` and shared by every head: they are kept whole.
Flux is guidance-distilled: it is calibrated without a CFG branch (``ConditionedCalibration(...,
cfg=False)``, `mosaicdiff.families.flux.calibration`) and samples with a flow-matching scheduler.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.adapter import (
    ModelAdapter,
    PrunableGroup,
    PrunedGroup,
    unwrap_model,
)
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.flux.blocks import (
    CompactFluxDoubleWeights,
    CompactFluxSingleWeights,
)

__all__ = ["FLUX", "FLUX_CONFIG_KEYS", "FluxAdapter", "FluxSkeleton", "block_facts", "check_flux", "skeleton_from_config",
           "skeleton_from_dense"]

#: The ``FluxTransformer2DModel`` config keys (a mosaic repeats them: ``FluxPipeline`` reads ``in_channels``
#: and ``guidance_embeds``).
FLUX_CONFIG_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                    "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                    "guidance_embeds", "axes_dims_rope")


def _is_tanh_gelu_ff(ff: nn.Module) -> bool:
    from diffusers.models.activations import GELU

    return isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh" and isinstance(ff.net[2], nn.Linear)


def _attention_problem(attn: nn.Module) -> str | None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(attn.processor) is not FluxAttnProcessor:
        return f"the attention processor {type(attn.processor).__name__} (only FluxAttnProcessor is supported)"
    if getattr(attn, "fused_projections", False):
        return "fused q/k/v projections (call unfuse_qkv_projections() first)"
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, name, None)
        if norm is not None and not isinstance(norm, nn.RMSNorm):
            return f"a {type(norm).__name__} as {name} (only RMSNorm is supported)"
    return None


def check_flux(model: nn.Module) -> None:
    """Refuse, in one line, Flux variants the compact blocks do not compute.

    Accepted: ``FluxTransformerBlock`` double-stream blocks then ``FluxSingleTransformerBlock``
    single-stream blocks (at least one block), the default ``FluxAttnProcessor`` (no IP-Adapter, no
    fused projections), RMSNorm q/k norms and tanh-GELU MLPs.

    Raises:
        ValueError: naming the block and what it uses.
    """
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    inner = unwrap_model(model)
    double, single = getattr(inner, "transformer_blocks", None), getattr(inner, "single_transformer_blocks", None)
    if not isinstance(double, nn.ModuleList) or not isinstance(single, nn.ModuleList) or len(double) + len(single) == 0:
        raise ValueError(f"expected a FluxTransformer2DModel with transformer_blocks and single_transformer_blocks, got "
                         f"{type(inner).__name__}")
    for where, blocks, cls in (("transformer_blocks", double, FluxTransformerBlock),
                               ("single_transformer_blocks", single, FluxSingleTransformerBlock)):
        for i, b in enumerate(blocks):
            if type(b) is not cls:
                what = f"a {type(b).__name__}, not a {cls.__name__}"
            elif cls is FluxTransformerBlock and not (_is_tanh_gelu_ff(b.ff) and _is_tanh_gelu_ff(b.ff_context)):
                what = "an MLP that is not tanh-GELU"
            elif cls is FluxSingleTransformerBlock and not (isinstance(b.act_mlp, nn.GELU)
                                                            and b.act_mlp.approximate == "tanh"):
                what = f"a {b.act_mlp!r} MLP activation (only tanh-GELU is supported)"
            else:
                what = _attention_problem(b.attn)
            if what:
                raise ValueError(f"{where}[{i}] of {type(inner).__name__} uses {what}, which MosaicFlux does not "
                                 f"compute")


def block_facts(model: nn.Module) -> dict[str, Any]:
    """``width``, ``heads``, ``head_dim``, ``mlp_hidden``, ``eps`` (LayerNorms) and ``qk_eps`` (the q/k
    RMSNorms) of a Flux transformer (every block has the same)."""
    inner = unwrap_model(model)
    cfg = inner.config
    heads, head_dim = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    width = heads * head_dim
    return {"width": width, "heads": heads, "head_dim": head_dim, "mlp_hidden": int(width * 4.0), "eps": 1e-6,
            "qk_eps": 1e-6, "num_layers": int(cfg.num_layers), "num_single_layers": int(cfg.num_single_layers)}


class FluxSkeleton(nn.Module):
    r"""The un-pruned parameters of a Flux transformer, stored once and shared by every stage.

    Parameters:
        pos_embed (`nn.Module`): diffusers' ``FluxPosEmbed`` (RoPE tables of the position ids; no weights).
        time_text_embed (`nn.Module`): timestep (+ guidance) and pooled-text embedding: ``temb``.
        context_embedder (`nn.Linear`), x_embedder (`nn.Linear`): the text and image input projections.
        double_mod_weight (`torch.Tensor` of shape `(L2, 12C, C)`), double_mod_bias (`(L2, 12C)`): every
            double block's ``norm1.linear`` (rows ``0..6C``) and ``norm1_context.linear`` (``6C..12C``).
        single_mod_weight (`torch.Tensor` of shape `(L1, 3C, C)`), single_mod_bias (`(L1, 3C)`): every
            single block's ``norm.linear``.
        norm_out (`nn.Module`): the final ``AdaLayerNormContinuous`` (its ``linear``: ``[scale | shift]``).
        proj_out (`nn.Linear`): the final projection.

    Every block's modulation is one GEMM per forward on these stacks (`modulation`).
    """

    def __init__(self, pos_embed: nn.Module, time_text_embed: nn.Module, context_embedder: nn.Linear,
                 x_embedder: nn.Linear, double_mod_weight: torch.Tensor, double_mod_bias: torch.Tensor,
                 single_mod_weight: torch.Tensor, single_mod_bias: torch.Tensor, norm_out: nn.Module,
                 proj_out: nn.Linear):
        super().__init__()
        self.pos_embed, self.time_text_embed = pos_embed, time_text_embed
        self.context_embedder, self.x_embedder = context_embedder, x_embedder
        self.double_mod_weight, self.double_mod_bias = frozen(double_mod_weight), frozen(double_mod_bias)
        self.single_mod_weight, self.single_mod_bias = frozen(single_mod_weight), frozen(single_mod_bias)
        self.norm_out, self.proj_out = norm_out, proj_out
        for p in self.parameters():
            p.requires_grad_(False)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's AdaLayerNormZero output from ``temb`` (B, C): ``(double, single)`` of shapes
        ``(B, L2, 12, C)`` (image chunks 0..5, text chunks 6..11) and ``(B, L1, 3, C)``."""
        act = nn.functional.silu(temb)
        C, B = act.shape[-1], act.shape[0]
        double = nn.functional.linear(act, self.double_mod_weight.reshape(-1, C), self.double_mod_bias.reshape(-1))
        single = nn.functional.linear(act, self.single_mod_weight.reshape(-1, C), self.single_mod_bias.reshape(-1))
        return double.view(B, -1, 12, C), single.view(B, -1, 3, C)


def _stack_modulation(blocks: Sequence[nn.Module], norms: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    weights = [torch.cat([getattr(b, n).linear.weight.detach() for n in norms]) for b in blocks]
    biases = [torch.cat([getattr(b, n).linear.bias.detach() for n in norms]) for b in blocks]
    return torch.stack(weights).clone(), torch.stack(biases).clone()


def skeleton_from_dense(dense: nn.Module) -> FluxSkeleton:
    """Copy the un-pruned modules of a dense Flux (of its blocks only the modulation linears) into a `FluxSkeleton`."""
    inner = unwrap_model(dense)
    C = inner.inner_dim
    if len(inner.transformer_blocks):
        dw, db = _stack_modulation(inner.transformer_blocks, ("norm1", "norm1_context"))
    else:
        dw, db = torch.empty(0, 12 * C, C), torch.empty(0, 12 * C)
    if len(inner.single_transformer_blocks):
        sw, sb = _stack_modulation(inner.single_transformer_blocks, ("norm",))
    else:
        sw, sb = torch.empty(0, 3 * C, C), torch.empty(0, 3 * C)
    ref = inner.proj_out.weight
    dw, db, sw, sb = (t.to(ref.device, ref.dtype) for t in (dw, db, sw, sb))
    return FluxSkeleton(copy.deepcopy(inner.pos_embed), copy.deepcopy(inner.time_text_embed),
                        copy.deepcopy(inner.context_embedder), copy.deepcopy(inner.x_embedder), dw, db, sw, sb,
                        copy.deepcopy(inner.norm_out), copy.deepcopy(inner.proj_out))


def skeleton_from_config(config: Mapping[str, Any]) -> tuple[FluxSkeleton, dict[str, Any]]:
    """An uninitialised skeleton and the block facts of the Flux a config describes.

    diffusers' model is built without blocks (under a forked RNG: the caller's random state is
    untouched), so the embedders and the final layer are exactly diffusers'.
    """
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        model = FluxTransformer2DModel.from_config({**cfg, "num_layers": 0, "num_single_layers": 0})
    facts = {**block_facts(model), "num_layers": int(cfg["num_layers"]),
             "num_single_layers": int(cfg["num_single_layers"])}
    C, L2, L1 = facts["width"], facts["num_layers"], facts["num_single_layers"]
    skeleton = FluxSkeleton(model.pos_embed, model.time_text_embed, model.context_embedder, model.x_embedder,
                            torch.empty(L2, 12 * C, C), torch.empty(L2, 12 * C), torch.empty(L1, 3 * C, C),
                            torch.empty(L1, 3 * C), model.norm_out, model.proj_out)
    return skeleton, facts


def _qk_norm_weight(norm: nn.Module, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's weight (ones when it has none), detached and copied."""
    if getattr(norm, "weight", None) is None:
        return torch.ones(head_dim, dtype=like.dtype, device=like.device)
    return norm.weight.detach().clone()


class FluxAdapter(ModelAdapter):
    """diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev / schnell); pruned into `MosaicFlux`."""

    name = "Flux"

    def handles(self, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(model, FluxTransformer2DModel)

    def validate(self, model: nn.Module) -> None:
        check_flux(model)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The double-stream blocks, then the single-stream ones."""
        inner = unwrap_model(model)
        return [*inner.transformer_blocks, *inner.single_transformer_blocks]

    def groups(self, block: nn.Module) -> Mapping[str, PrunableGroup]:
        from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

        attn = block.attn
        if isinstance(block, FluxTransformerBlock):
            producers = (attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            return {"attn": PrunableGroup("heads", attn.to_out[0], producers, attn.head_dim,
                                          more_consumers=(attn.to_add_out,)),
                    "ff": PrunableGroup("channels", block.ff.net[2], (block.ff.net[0].proj,), 1),
                    "ff_context": PrunableGroup("channels", block.ff_context.net[2], (block.ff_context.net[0].proj,),
                                                1)}
        inner = attn.heads * attn.head_dim
        return {"attn": PrunableGroup("heads", block.proj_out, (attn.to_q, attn.to_k, attn.to_v), attn.head_dim,
                                      units=attn.heads),
                "mlp": PrunableGroup("channels", block.proj_out, (block.proj_mlp,), 1, consumer_offset=inner,
                                     units=block.mlp_hidden_dim)}

    def run(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Mapping[str, Any]) -> Any:
        """One forward of the dense Flux on a calibration batch, as ``FluxPipeline`` calls it.

        `x_t` (B, C, H, W) unpacked latents are packed into 2x2 patches (``(B, HW/4, 4C)``); `t` in the
        scheduler's 0..1000 units is passed as ``t / 1000`` (the model multiplies it back);
        ``img_ids`` / ``txt_ids`` default to the pipeline's; ``guidance`` (the guidance scale, as
        the pipeline passes it) is broadcast to the batch.
        """
        from mosaicdiff.families.flux.calibration import flux_forward_inputs

        return model(**flux_forward_inputs(x_t, t, condition))

    def check_calibration(self, model: nn.Module, calibration: Any) -> None:
        """Text states, pooled projections, the ids and guidance against the model; see
        `mosaicdiff.families.flux.calibration.check_flux_calibration`."""
        from mosaicdiff.families.flux.calibration import check_flux_calibration

        check_flux_calibration(unwrap_model(model), calibration)

    def default_null_conditions(self, model: nn.Module, calibration: Any) -> Mapping[str, Any] | None:
        """None: Flux is guidance-distilled (no CFG branch); the calibration must say ``cfg=False``."""
        from mosaicdiff.families.flux.calibration import NO_CFG

        raise ValueError(NO_CFG)

    def dense_block(self, block: nn.Module):
        from mosaicdiff.method import compact

        return self.compact_block(block, compact.prune_groups(self.groups(block), None, 0.0, method="magnitude",
                                                              align=None))

    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]):
        attn, a = block.attn, pruned["attn"]
        hd, like = attn.head_dim, a.consumer_weight
        norms = {f"norm_{n}": _qk_norm_weight(getattr(attn, f"norm_{n}"), hd, like) for n in ("q", "k")}
        if "ff" in pruned:
            ff, fc = pruned["ff"], pruned["ff_context"]
            norms.update({f"norm_added_{n}": _qk_norm_weight(getattr(attn, f"norm_added_{n}"), hd, like)
                          for n in ("q", "k")})
            return CompactFluxDoubleWeights(
                kept_heads=a.kept, kept_channels=ff.kept, kept_context_channels=fc.kept,
                qkv_weight=torch.cat(a.producer_weights[:3]), qkv_bias=torch.cat(a.producer_biases[:3]),
                add_qkv_weight=torch.cat(a.producer_weights[3:]), add_qkv_bias=torch.cat(a.producer_biases[3:]),
                out_weight=a.consumer_weight, out_bias=a.consumer_bias,
                add_out_weight=a.more_consumer_weights[0], add_out_bias=a.more_consumer_biases[0], **norms,
                ff1_weight=ff.producer_weights[0], ff1_bias=ff.producer_biases[0], ff2_weight=ff.consumer_weight,
                ff2_bias=ff.consumer_bias, ffc1_weight=fc.producer_weights[0], ffc1_bias=fc.producer_biases[0],
                ffc2_weight=fc.consumer_weight, ffc2_bias=fc.consumer_bias)
        m = pruned["mlp"]
        return CompactFluxSingleWeights(
            kept_heads=a.kept, kept_channels=m.kept,
            proj_weight=torch.cat([*a.producer_weights, *m.producer_weights]),
            proj_bias=torch.cat([*a.producer_biases, *m.producer_biases]),
            out_weight=torch.cat([a.consumer_weight, m.consumer_weight], dim=1), out_bias=a.consumer_bias, **norms)

    def block_widths(self, block: nn.Module, weights) -> dict[str, float]:
        hidden = block.proj_mlp.out_features if hasattr(block, "proj_mlp") else block.ff.net[2].in_features
        heads = int(block.attn.heads)
        k, f = weights.kept_heads.numel(), weights.kept_channels.numel()
        return {"heads": int(k), "mlp": int(f), "head_sparsity": 1 - k / heads, "mlp_sparsity": 1 - f / hidden}

    def shared_skeleton(self, model: nn.Module) -> FluxSkeleton:
        return skeleton_from_dense(model)

    def noise_process(self, model: nn.Module, scheduler, calibration: Any = None):
        """A dynamic-shift scheduler (``pipe.scheduler``) as ``FluxPipeline`` runs it at the calibration
        latents' size: ``mu`` of their ``(H / 2) * (W / 2)`` packed tokens (4096 without calibration
        data: 1024 px) and the pipeline's sigma grid ``linspace(1, 1 / n, n)``."""
        from mosaicdiff.core.schedulers import NoiseProcess, noise_process

        if isinstance(scheduler, NoiseProcess) or not getattr(scheduler, "config", {}).get("use_dynamic_shifting"):
            return noise_process(scheduler)
        latents = getattr(calibration, "x0", None)
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2) if latents is not None else 4096
        return noise_process(scheduler, image_seq_len=int(tokens), sampler_sigmas="flux")

    def default_scheduler(self):
        """FLUX.1's sampler as ``FluxPipeline`` runs it at 1024 px: flow-matching Euler with FLUX.1-dev's
        scheduler config (dynamic shifting, ``mu`` for 4096 latent tokens) and the pipeline's sigma
        grid, as a `mosaicdiff.core.schedulers.RectifiedFlowProcess` (what ``prune(scheduler=...)``
        also takes: ``noise_process(pipe.scheduler, image_seq_len=..., sampler_sigmas="flux")``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from mosaicdiff.core.schedulers import noise_process
        from mosaicdiff.families.flux.configs import FLUX_DEV_SCHEDULER

        return noise_process(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), image_seq_len=4096,
                             sampler_sigmas="flux")


#: The Flux adapter (stateless: one instance serves every Flux transformer).
FLUX = FluxAdapter()

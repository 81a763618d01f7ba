"""The stage-switching Flux: one shared skeleton, one set of compact blocks per stage.

`MosaicFlux` is a diffusers model (``ModelMixin`` + ``ConfigMixin``) and a drop-in replacement for
``FluxTransformer2DModel`` at inference: the same ``forward`` signature and output, and a config
holding the dense model's keys, so ``pipe.transformer = mosaic`` works in ``FluxPipeline``. The
pipeline passes ``t / 1000`` (t the flow-matching scheduler's timestep, ``1000 * sigma``): the
stage is chosen from ``1000 * timestep`` (read once per forward on the host). Everything pruning
does not touch (the embedders, RoPE, every block's modulation linears, the final layer) is stored
once (`mosaicdiff.families.flux.adapter.FluxSkeleton`); by default (``mosaicdiff.prune``) each block
position stores its producer rows once for all stages (``producer_storage``,
`mosaicdiff.families.flux.producers`) and the stages only their compensated consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from mosaicdiff.core.block_cache import MosaicCacheMixin, PairedJointBlock
from mosaicdiff.core.model import MosaicModel, skip_weight_init, split_rows
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.shared_producers import share_stages
from mosaicdiff.core.stages import StageSpec, checked_stage_configs
from mosaicdiff.core.traced_stages import run_stage_traced
from mosaicdiff.families.flux import adapter as flux
from mosaicdiff.families.flux import lora as flux_lora
from mosaicdiff.families.flux.blocks import (
    CompactFluxDoubleBlock,
    CompactFluxDoubleWeights,
    CompactFluxSingleBlock,
    CompactFluxSingleWeights,
)
from mosaicdiff.families.flux.producers import (
    empty_shared_block,
    install_shared_blocks,
    share_flux_producers,
    storage_class,
)

logger = logging.getLogger(__name__)

__all__ = ["MosaicFlux"]


class MosaicFlux(MosaicCacheMixin, MosaicModel):
    r"""A pruned Flux transformer whose blocks change with the denoising stage; a drop-in
    ``FluxTransformer2DModel``.

    Build one with `mosaicdiff.prune` (`from_dense`) or `from_pretrained`; the constructor builds the
    model from its config with initialised weights (torch's defaults, as a diffusers constructor).

    Parameters:
        patch_size ... axes_dims_rope: the dense ``FluxTransformer2DModel`` config
            (`mosaicdiff.families.flux.adapter.FLUX_CONFIG_KEYS`).
        stages (`list[dict]`): per stage ``name``, ``t_start``, ``t_end`` (exclusive, in the
            scheduler's 0..1000 units), ``sparsity`` and per block (the ``num_layers`` double blocks,
            then the ``num_single_layers`` single ones) ``kept_heads``, ``kept_channels`` and, for a
            double block, ``kept_context_channels`` (the text stream's MLP); the ranges tile [0, 1001)
            (flow matching's first step is t = 1000).
        shared_producers (`list[dict]`, *optional*): per block position the stored units in storage
            order (``heads``, ``channels``, and ``context_channels`` for a double block); each stage's
            kept lists are a contiguous run of them. None: every stage stores its own producers.
        dense_reference (`dict`, *optional*): ``params``, ``bytes``, ``dtype`` of the dense model.
        meta (`dict`, *optional*): how the mosaic was made (JSON-serialisable).

    Raises:
        ValueError: stages that do not tile the timesteps or do not fit the architecture.
        TypeError: a ``meta`` that is not JSON-serialisable.

    Examples:
        >>> import mosaicdiff  # doctest: +SKIP
        >>> from mosaicdiff.calibrate import ConditionedCalibration  # doctest: +SKIP
        >>> calib = ConditionedCalibration(latents, {"encoder_hidden_states": prompt_embeds,
        ...                                          "pooled_projections": pooled, "guidance": 3.5}, cfg=False)  # doctest: +SKIP
        >>> pipe.transformer = mosaicdiff.prune(pipe.transformer, calib, 0.3)  # doctest: +SKIP

        The stages are planned on FLUX.1-dev's 1024 px sampler by default; for another resolution pass
        ``scheduler=noise_process(pipe.scheduler, image_seq_len=(height // 16) * (width // 16),
        sampler_sigmas="flux")`` (`mosaicdiff.core.schedulers.noise_process`).
    """

    #: Saved folders (`mosaicdiff.core.serialization`).
    format_name = "mosaicdiff.MosaicFlux"
    format_version = "1.0"
    readable_majors = (1,)
    dense_config_keys = flux.FLUX_CONFIG_KEYS
    _no_split_modules = ["CompactFluxDoubleBlock", "CompactFluxSingleBlock", "SharedFluxDoubleBlock",
                         "SharedFluxSingleBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["CompactFluxDoubleBlock", "CompactFluxSingleBlock", "SharedFluxDoubleBlock",
                        "SharedFluxSingleBlock"]
    #: Where a dense Flux LoRA's linears live (`mosaicdiff.core.lora`).
    _lora_targets = flux_lora.lora_targets
    #: diffusers' caches (`mosaicdiff.core.block_cache`): the double blocks take and return (image, text).
    _cache_two_stream_blocks = (CompactFluxDoubleBlock,)

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        stages: list[dict] | None = None,
        shared_producers: list[dict] | None = None,
        dense_reference: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        stages = checked_stage_configs("MosaicFlux", stages, meta)
        self.shared, self._facts = flux.skeleton_from_config(self.dense_config)
        f = self._facts
        layers = f["num_layers"] + f["num_single_layers"]
        for spec in stages:
            if len(spec["blocks"]) != layers:
                raise ValueError(f"MosaicFlux: stage {spec['name']!r} has {len(spec['blocks'])} blocks, the model "
                                 f"{layers} (num_layers + num_single_layers)")
        if shared_producers is None:
            self.producer_storage = None
            self.stage_blocks = nn.ModuleList(
                nn.ModuleList(self._empty_block(j, b) for j, b in enumerate(s["blocks"])) for s in stages)
        else:
            self._empty_shared_blocks(stages, [dict(p) for p in shared_producers])
        self._init_stages(stages)
        self.eval()

    # ------------------------------------------------------------------ building

    def _empty_block(self, position: int, kept: dict) -> nn.Module:
        f = self._facts
        double = position < f["num_layers"]
        limits = {"kept_heads": f["heads"], "kept_channels": f["mlp_hidden"]}
        if double:
            limits["kept_context_channels"] = f["mlp_hidden"]
        idx = {}
        for key, limit in limits.items():
            values = [int(v) for v in kept.get(key, ())]
            if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
                raise ValueError(f"MosaicFlux: block {position}: {key} must be unique indices in [0, {limit}), got "
                                 f"{values}")
            idx[key] = torch.as_tensor(values, dtype=torch.int64, device="cpu").reshape(-1)
        counts = [idx[k].numel() for k in limits]
        cls, wcls = (CompactFluxDoubleBlock, CompactFluxDoubleWeights) if double else \
            (CompactFluxSingleBlock, CompactFluxSingleWeights)
        shapes = cls.shapes_for(tuple(counts), f["head_dim"], f["width"])
        return cls(wcls(**idx, **{k: torch.empty(s) for k, s in shapes.items()}), f["head_dim"], f["eps"], f["qk_eps"])

    def _empty_shared_blocks(self, stages: list[dict], shared_producers: list[dict]) -> None:
        f = self._facts
        if len(shared_producers) != len(stages[0]["blocks"]):
            raise ValueError(f"MosaicFlux: shared_producers needs one entry per block ({len(stages[0]['blocks'])}), "
                             f"got {len(shared_producers)}")
        stores, self.stage_blocks = [], nn.ModuleList(nn.ModuleList() for _ in stages)
        for j, units in enumerate(shared_producers):
            kind = "double" if j < f["num_layers"] else "single"
            limits = {"heads": f["heads"], "channels": f["mlp_hidden"], "context_channels": f["mlp_hidden"]}
            for key in ("heads", "channels", "context_channels")[:3 if kind == "double" else 2]:
                values = units.get(key)
                if not isinstance(values, list) or len(set(values)) != len(values) \
                        or any(not 0 <= v < limits[key] for v in values):
                    raise ValueError(f"MosaicFlux: shared_producers[{j}].{key} must be unique indices in "
                                     f"[0, {limits[key]}), got {values}")
            store = storage_class(kind)(units, f["head_dim"], f["width"])
            for i, s in enumerate(stages):
                try:
                    block = empty_shared_block(store, s["blocks"][j], f["head_dim"], f["eps"], f["qk_eps"])
                except ValueError as exc:
                    raise ValueError(f"MosaicFlux: stage {s['name']!r} block {j} does not fit shared_producers[{j}]: "
                                     f"{exc}") from None
                self.stage_blocks[i].append(block)
            stores.append(store)
        self.producer_storage = nn.ModuleList(stores)

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicFlux:
        """A mosaic of a dense Flux and its pruned stages (the dense model is left unchanged; its
        un-pruned modules are copied once, its blocks not at all).

        Args:
            dense (`FluxTransformer2DModel`): the dense model.
            stages (`list[StageSpec]`): contiguous timestep ranges, each with one compact weights object
                per block (double blocks, then single ones), converted to the dense model's device and dtype.
            source (`str`, *optional*): saved in ``meta["source"]``.
            meta (`dict`, *optional*): JSON-serialisable information saved with the model.
            share_producers (`bool`, *optional*): True: store every block position's producer rows
                once (the stages' kept sets must nest, as ``mosaicdiff.prune`` selects them); False:
                a copy per stage; None: share where the kept sets allow.

        Raises:
            ValueError: a Flux variant the compact blocks do not compute, stages that do not fit, or
                ``share_producers=True`` with kept sets that cannot share one storage.
        """
        flux.check_flux(dense)
        inner = flux.unwrap_model(dense)
        meta = {**(meta or {}), **({"source": source} if source else {})}
        ref = next(inner.parameters())

        def to_model(w):  # the dense model's device and dtype
            return type(w)(**{k: (v if k.startswith("kept_") else v.detach().to(ref.device, ref.dtype))
                              for k, v in w.tensors().items()})

        like = [[to_model(w) for w in spec.blocks] for spec in stages]
        stage_cfgs = [{"name": s.name, "t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity),
                       "blocks": [{k: getattr(w, k).tolist() for k in w.index_fields} for w in s.blocks]}
                      for s in stages]
        head_dim = int(inner.config.attention_head_dim)
        head_dims = [head_dim] * (len(inner.transformer_blocks) + len(inner.single_transformer_blocks))
        shared, units = share_stages(share_flux_producers, like, head_dims, share_producers, stage_cfgs)
        config = {k: inner.config[k] for k in flux.FLUX_CONFIG_KEYS if k in inner.config}
        with skip_weight_init():  # every weight is assigned below
            mosaic = cls(**config, stages=stage_cfgs, shared_producers=units, meta=meta,
                         dense_reference=cls.dense_reference_of(inner))
        mosaic.shared = flux.skeleton_from_dense(inner)
        f = mosaic._facts
        if shared is not None:
            install_shared_blocks(mosaic, shared, head_dim, f["eps"], f["qk_eps"])
            return mosaic.eval()
        for i, stage in enumerate(like):
            for j, w in enumerate(stage):
                block_cls = CompactFluxDoubleBlock if j < f["num_layers"] else CompactFluxSingleBlock
                mosaic.stage_blocks[i][j] = block_cls(w, f["head_dim"], f["eps"], f["qk_eps"])
        return mosaic.eval()

    # ------------------------------------------------------------------ forward

    def stage_timestep(self, timestep: torch.Tensor | float) -> torch.Tensor | float:
        """The stage table's timestep of the forward's `timestep` (``t / 1000``): ``1000 * timestep``,
        clamped into the stages' range (low-precision timesteps may round just past an end)."""
        top = max(t1 for _, _, t1, _ in self._ranges) - 1
        if isinstance(timestep, torch.Tensor):
            return (timestep.detach().float() * 1000).clamp(0, top)
        return min(max(float(timestep) * 1000, 0.0), float(top))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ):
        r"""``FluxTransformer2DModel.forward`` with the stage picked from `timestep`.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, L, in_channels)`): the packed latents.
            encoder_hidden_states (`torch.Tensor` of shape `(B, S, joint_attention_dim)`): the T5 states.
            pooled_projections (`torch.Tensor` of shape `(B, pooled_projection_dim)`): the pooled CLIP states.
            timestep (`torch.Tensor` of shape `(B,)` or `()`, or a number): ``t / 1000`` as the pipeline
                passes it. A batch whose rows fall in several stages runs each stage on its rows.
            img_ids (`torch.Tensor` of shape `(L, 3)`), txt_ids (`(S, 3)`): RoPE position ids.
            guidance (`torch.Tensor` of shape `(B,)`, *optional*): the guidance scale (a model with
                ``guidance_embeds``).
            joint_attention_kwargs, controlnet_*: not supported (None).
            return_dict (`bool`, *optional*, defaults to True): return a ``Transformer2DModelOutput``.

        Returns:
            ``Transformer2DModelOutput(sample=(B, L, patch_size**2 * out_channels))`` or ``(sample,)``.

        Raises:
            ValueError: missing inputs, a timestep outside every stage, inputs of the wrong shape.
            NotImplementedError: ``joint_attention_kwargs`` (LoRA scale, IP-Adapter) or ControlNet residuals.
        """
        if joint_attention_kwargs:
            raise NotImplementedError(f"MosaicFlux does not support joint_attention_kwargs, got keys "
                                      f"{sorted(joint_attention_kwargs)}")
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise NotImplementedError("MosaicFlux does not support ControlNet residuals")
        img_ids = img_ids[0] if isinstance(img_ids, torch.Tensor) and img_ids.dim() == 3 else img_ids
        txt_ids = txt_ids[0] if isinstance(txt_ids, torch.Tensor) and txt_ids.dim() == 3 else txt_ids
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                           guidance)
        batch, device = int(hidden_states.shape[0]), hidden_states.device
        t_vec = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        g_vec = None if guidance is None else torch.as_tensor(guidance, device=device).reshape(-1).expand(batch)
        call = (hidden_states, encoder_hidden_states, pooled_projections, t_vec, img_ids, txt_ids, g_vec)
        if torch.compiler.is_compiling():  # no host read: the stage is chosen in the graph
            out = run_stage_traced(self, self.stage_timestep(timestep), batch, device,
                                   lambda stage, _: self.forward_stage(stage, *call))
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)
        groups = self.stage_rows(self.stage_timestep(timestep), batch)  # one host read

        def run(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            args = call if rows is None else split_rows(call, rows, batch)
            self._notify_stage(stage, int(args[0].shape[0]), int(hidden_states.shape[1]), hidden_states.dtype, device)
            if self._graphs is not None and args[-1] is not None:
                return self._graphs(stage, *args)
            if self._graphs is not None:
                return self._graphs(stage, *args[:-1])
            return self.forward_stage(stage, *args)

        out = self.run_by_stage(groups, batch, run)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, hidden_states, text, pooled, timestep, img_ids, txt_ids, guidance) -> None:
        """Shapes, dtype and device from metadata only (no device sync)."""
        cfg = self.config

        def shape(x):
            return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__

        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[2] != int(cfg.in_channels):
            raise ValueError(f"MosaicFlux.forward: hidden_states must be (B, L, {cfg.in_channels}) packed latents, got "
                             f"{shape(hidden_states)}")
        B, L, _ = hidden_states.shape
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != B \
                or text.shape[2] != int(cfg.joint_attention_dim):
            raise ValueError(f"MosaicFlux.forward: encoder_hidden_states must be ({B}, S, {cfg.joint_attention_dim}) "
                             f"text states, got {shape(text)}")
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (B, int(cfg.pooled_projection_dim)):
            raise ValueError(f"MosaicFlux.forward: pooled_projections must be ({B}, {cfg.pooled_projection_dim}), got "
                             f"{shape(pooled)}")
        if timestep is None:
            raise ValueError("MosaicFlux.forward: `timestep` is required (got None)")
        for name, ids, n in (("img_ids", img_ids, L), ("txt_ids", txt_ids, text.shape[1])):
            if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (n, 3):
                raise ValueError(f"MosaicFlux.forward: {name} must be ({n}, 3) position ids, got {shape(ids)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("MosaicFlux.forward: this Flux embeds the guidance scale (guidance_embeds=True): pass "
                             "`guidance`")
        weight = self.shared.norm_out.linear.weight  # (layerwise casting leaves "norm" modules in the compute dtype)
        if hidden_states.dtype != weight.dtype:
            raise TypeError(f"MosaicFlux.forward: hidden_states is {hidden_states.dtype} but the weights are "
                            f"{weight.dtype}; pass hidden_states.to(model.dtype)")
        if hidden_states.device != weight.device:
            raise ValueError(f"MosaicFlux.forward: hidden_states is on {hidden_states.device} but the model is on "
                             f"{weight.device}; move one of them")

    def forward_stage(self, stage: int, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                      txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-capturable forward of one stage: tensors only, no host reads.

        Args:
            stage (`int`): the stage to run.
            hidden_states ... guidance: as `forward` (``timestep`` and ``guidance`` of shape (B,)).

        Returns:
            `torch.Tensor` of shape `(B, L, patch_size**2 * out_channels)`.
        """
        from mosaic_kernels import ops

        sk, f = self.shared, self._facts
        # 1. Inputs: embedded streams, temb, RoPE of [text | image], every block's modulation at once.
        img = sk.x_embedder(hidden_states)
        t = timestep.to(img.dtype) * 1000
        if guidance is None:
            temb = sk.time_text_embed(t, pooled_projections)
        else:
            temb = sk.time_text_embed(t, guidance.to(img.dtype) * 1000, pooled_projections)
        txt = sk.context_embedder(encoder_hidden_states)
        cos, sin = sk.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        double_mod, single_mod = sk.modulation(temb)
        blocks, L2, L1, St = self.stage_blocks[stage], f["num_layers"], f["num_single_layers"], txt.shape[1]
        # 2. Double-stream blocks, then the single-stream ones on the joint [text | image] stream.
        if self.fuse_block_boundaries:  # each block hands the next its modulated norm
            h = self._fused_chain(blocks, img, txt, double_mod, single_mod, cos, sin)
        else:
            for i in range(L2):
                img, txt = blocks[i](img, txt, double_mod[:, i], cos, sin)
            paired = self.cache_stage_blocks(stage, "single_transformer_blocks") or []
            if paired and isinstance(paired[0], PairedJointBlock):  # a first-block cache: one residual per stream
                for j, block in enumerate(paired):
                    img, txt = block(img, txt, single_mod[:, j], cos, sin)
                h = torch.cat([txt, img], dim=1)
            else:
                h = torch.cat([txt, img], dim=1)
                for j in range(L1):
                    h = blocks[L2 + j](h, single_mod[:, j], cos, sin)
        # 3. Output: the image tokens' final modulated norm ([scale | shift]) and projection.
        emb = sk.norm_out.linear(nn.functional.silu(temb).to(h.dtype))
        scale, shift = emb.chunk(2, dim=1)
        return sk.proj_out(ops.ln_modulate(h[:, St:].contiguous(), shift, scale, sk.norm_out.norm.eps))

    def _cache_block_lists(self, stage: int, config) -> dict[str, list[nn.Module]]:
        """The double blocks, then the single ones; under a first-block cache over both kinds the single
        blocks run through `PairedJointBlock` (diffusers keeps one residual per stream)."""
        from diffusers.hooks import FirstBlockCacheConfig

        blocks, L2 = list(self.stage_blocks[stage]), self._facts["num_layers"]
        doubles, singles = blocks[:L2], blocks[L2:]
        if isinstance(config, FirstBlockCacheConfig) and doubles and singles:
            singles = [PairedJointBlock(b) for b in singles]
        return {"transformer_blocks": doubles, "single_transformer_blocks": singles}

    def _fused_chain(self, blocks, img, txt, double_mod, single_mod, cos, sin) -> torch.Tensor:
        """The blocks with each gated residual fused with the next block's modulated norm (the last
        double block's with the first single block's, whose per-token norm of ``[text | image]`` is
        each stream's norm side by side); the joint stream out."""
        f = self._facts
        L2, L1, eps = f["num_layers"], f["num_single_layers"], f["eps"]
        if L2:
            x_img, x_txt = blocks[0].norm1(img, txt, double_mod[:, 0])
        for i in range(L2):
            if i + 1 < L2:
                nxt = (*double_mod[:, i + 1, 0:2].unbind(1), *double_mod[:, i + 1, 6:8].unbind(1), eps)
            else:
                nxt = (single_mod[:, 0, 0], single_mod[:, 0, 1]) * 2 + (eps,) if L1 else None
            img, txt, x_img, x_txt = blocks[i].forward_normed(img, txt, x_img, x_txt, double_mod[:, i], cos, sin, nxt)
        h = torch.cat([txt, img], dim=1)
        if not L1:
            return h
        x = torch.cat([x_txt, x_img], dim=1) if L2 else blocks[0].norm1(h, single_mod[:, 0])
        for j in range(L1):
            nxt = (single_mod[:, j + 1, 0], single_mod[:, j + 1, 1], eps) if j + 1 < L1 else None
            h, x = blocks[L2 + j].forward_normed(h, x, single_mod[:, j], cos, sin, nxt)
        return h

    def stage_kernel_shapes(self, stage: int, batch: int, tokens: int,
                            dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The kernel-op shapes of a stage's image-side blocks (`StageRuntimeMixin.stage_kernel_shapes`;
        the text tokens are not known here)."""
        C, M = self._facts["width"], batch * tokens
        items = {("ln_modulate", (batch, tokens, C)), ("gated_residual_ln_modulate", (batch, tokens, C))}
        for b in self.stage_blocks[stage]:
            items.add(("attention", (batch, tokens, b.heads, b.head_dim)))
            if isinstance(b, CompactFluxDoubleBlock):
                items |= {("linear_gelu", (M, b.mlp_width, C)), ("linear_gated_residual", (M, C, b.mlp_width))}
            else:
                items.add(("linear_gated_residual", (M, C, b.heads * b.head_dim + b.mlp_width)))
        return [(op, shape, dtype) for op, shape in sorted(items)]

    # ------------------------------------------------------------------ memory, persistence

    def _memory_skeleton(self) -> nn.Module:
        return self.shared

    def extra_repr(self) -> str:
        f = self._facts
        return (f"num_layers={f['num_layers']}, num_single_layers={f['num_single_layers']}, width={f['width']}, "
                f"{super().extra_repr()}")

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        need = check_common_fields(cls, config, cfg_path, ("kept_heads", "kept_channels"))
        for key in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                    "joint_attention_dim", "pooled_projection_dim"):
            value = config.get(key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key,
                 "a non-negative integer", value)
        shared = config.get("shared_producers")
        need(shared is None or isinstance(shared, list), "shared_producers", "null or a list", shared)
        for j, p in enumerate(shared or []):
            for key in ("heads", "channels") + (("context_channels",) if j < config["num_layers"] else ()):
                v = p.get(key) if isinstance(p, dict) else None
                need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                     f"shared_producers[{j}].{key}", "a list of integers", v)
        for i, s in enumerate(config["stages"]):
            for j, b in enumerate(s["blocks"][:config["num_layers"]]):
                v = b.get("kept_context_channels")
                need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                     f"stages[{i}].blocks[{j}].kept_context_channels", "a list of integers", v)

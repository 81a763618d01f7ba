"""The stage-switching SD3: one shared skeleton, one set of compact blocks per stage.

`MosaicSD3` is a diffusers model (``ModelMixin`` + ``ConfigMixin``) and a drop-in replacement for
``SD3Transformer2DModel`` at inference: the same ``forward`` signature and output, and a config
holding the dense model's keys, so ``pipe.transformer = mosaic`` works in
``StableDiffusion3Pipeline``. The sampler's timestep (SD3's pipeline passes ``1000 * sigma``, floats)
picks the stage. Everything pruning does not touch (patch embedding, timestep + pooled embedding,
caption projection, every block's modulation linears as one matrix, the final layer) is stored once;
by default (``mosaicdiff.prune``) each block position stores its producer rows once for all stages
(``producer_storage``, `mosaicdiff.families.sd3.producers`) and the stages only their compensated
consumers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from mosaicdiff.core.adapter import unwrap_model
from mosaicdiff.core.model import MosaicModel, skip_weight_init, split_rows
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.shared_producers import share_stages
from mosaicdiff.core.stages import StageSpec, checked_stage_configs
from mosaicdiff.core.traced_stages import run_stage_traced
from mosaicdiff.families.sd3 import adapter as sd3
from mosaicdiff.families.sd3 import lora as sd3_lora
from mosaicdiff.families.sd3.blocks import (
    SD3_INDEX_FIELDS,
    CompactSD3Block,
    CompactSD3BlockWeights,
    sd3_block_shapes,
)
from mosaicdiff.families.sd3.producers import (
    KINDS,
    SharedSD3Block,
    empty_sd3_shared_blocks,
    share_sd3_producers,
    unit_limits,
)
from mosaicdiff.families.sd3.skeleton import skeleton_from_config, skeleton_from_dense

__all__ = ["MosaicSD3"]



class MosaicSD3(MosaicModel):
    r"""A pruned SD3 / SD3.5 transformer whose blocks change with the denoising stage; a drop-in
    ``SD3Transformer2DModel``.

    Build one with `mosaicdiff.prune` (`from_dense`) or `from_pretrained`; the constructor builds the
    model from its config with initialised weights (torch's defaults, as a diffusers constructor).

    Parameters:
        sample_size ... qk_norm: the dense ``SD3Transformer2DModel`` config
            (`mosaicdiff.families.sd3.adapter.SD3_CONFIG_KEYS`).
        stages (`list[dict]`): per stage ``name``, ``t_start``, ``t_end`` (exclusive), ``sparsity``
            and per block ``kept_heads``, ``kept_heads2`` (attn2, empty without it), ``kept_channels``
            and ``kept_context_channels`` (empty in the last block); the ranges tile [0, 1000).
        shared_producers (`list[dict]`, *optional*): per block position the stored units in storage
            order (``heads``, ``heads2``, ``channels``, ``context_channels``); each stage's kept lists
            are a contiguous run of them. None: every stage stores its own producers.
        dense_reference (`dict`, *optional*): ``params``, ``bytes``, ``dtype`` of the dense model.
        meta (`dict`, *optional*): how the mosaic was made (JSON-serialisable).

    Raises:
        ValueError: stages that do not tile the timesteps or do not fit the architecture;
            ``shared_producers`` of the wrong length or that a stage's kept lists do not fit.
        TypeError: a ``meta`` that is not JSON-serialisable.

    Examples:
        >>> import mosaicdiff  # doctest: +SKIP
        >>> mosaic = mosaicdiff.prune(pipe.transformer, calib, 0.3, scheduler=pipe.scheduler)  # doctest: +SKIP
        >>> pipe.transformer = mosaic  # doctest: +SKIP
        >>> image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
        ...              negative_pooled_prompt_embeds=neg_pooled).images[0]  # doctest: +SKIP
    """

    #: Saved folders (`mosaicdiff.core.serialization`).
    format_name = "mosaicdiff.MosaicSD3"
    format_version = "1.0"
    #: The dense model's config keys this mosaic's config repeats (`MosaicModel.dense_config`).
    dense_config_keys = sd3.SD3_CONFIG_KEYS
    readable_majors = (1,)
    # diffusers model attributes (`MosaicModel.enable_layerwise_casting`, ``compile_repeated_blocks``):
    # SD3Transformer2DModel's, its JointTransformerBlock replaced by the compact blocks.
    _no_split_modules = ["CompactSD3Block", "SharedSD3Block", "PatchEmbed"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["CompactSD3Block", "SharedSD3Block"]
    #: Where a dense SD3 LoRA's linears live (`mosaicdiff.core.lora`).
    _lora_targets = sd3_lora.lora_targets

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        stages: list[dict] | None = None,
        shared_producers: list[dict] | None = None,
        dense_reference: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        stages = checked_stage_configs("MosaicSD3", stages, meta)
        self.shared, self._facts = skeleton_from_config(self.dense_config)
        layers = self._facts["num_layers"]
        for spec in stages:
            if len(spec["blocks"]) != layers:
                raise ValueError(f"MosaicSD3: stage {spec['name']!r} has {len(spec['blocks'])} blocks, the model "
                                 f"{layers} (num_layers)")
        if shared_producers is None:
            self.producer_storage = None
            self.stage_blocks = nn.ModuleList(nn.ModuleList(self._empty_block(b, j) for j, b in enumerate(s["blocks"]))
                                              for s in stages)
        else:
            self.producer_storage, self.stage_blocks = empty_sd3_shared_blocks(
                stages, [dict(p) for p in shared_producers], self._facts)
        self._init_stages(stages)
        self.eval()

    # ------------------------------------------------------------------ building

    def _empty_block(self, kept: dict, j: int) -> CompactSD3Block:
        f, kind = self._facts, self._facts["kinds"][j]
        idx = {k: torch.as_tensor(kept.get(k, ()), dtype=torch.int64, device="cpu").reshape(-1)
               for k in SD3_INDEX_FIELDS}
        for key, limit in unit_limits(f, kind).items():
            values = idx[f"kept_{key}"].tolist()
            if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
                raise ValueError(f"MosaicSD3: block {j} kept_{key} must be unique indices in [0, {limit}), got "
                                 f"{values}")
        shapes = sd3_block_shapes(kind, *(idx[k].numel() for k in SD3_INDEX_FIELDS), f["head_dim"], f["width"])
        weights = CompactSD3BlockWeights(**idx, **{k: torch.empty(s) for k, s in shapes.items()})
        return CompactSD3Block(weights, kind, f["head_dim"], f["eps"], f["qk_eps"])

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicSD3:
        """A mosaic of a dense SD3 and its pruned stages (the dense model is left unchanged; its un-pruned
        modules are copied once, its blocks not at all).

        Args:
            dense (`SD3Transformer2DModel`): the dense model.
            stages (`list[StageSpec]`): contiguous timestep ranges, each with one
                `CompactSD3BlockWeights` per block (converted to the dense model's device and dtype).
            source (`str`, *optional*): saved in ``meta["source"]``.
            meta (`dict`, *optional*): JSON-serialisable information saved with the model.
            share_producers (`bool`, *optional*): True: store every block position's producer rows
                once (the stages' kept sets must nest, as ``mosaicdiff.prune`` selects them); False: a
                copy per stage; None: share where the kept sets allow.

        Raises:
            ValueError: an SD3 variant the compact block does not compute, stages that do not fit, or
                ``share_producers=True`` with kept sets that cannot share one storage.
        """
        sd3.check_sd3(dense)
        inner = unwrap_model(dense)
        meta = {**(meta or {}), **({"source": source} if source else {})}
        # a flow scheduler's stages tile [0, T + 1) (t = T at sigma = 1): the stages say where they end
        meta.setdefault("num_train_timesteps", max((int(s.t_end) for s in stages), default=1000))
        ref = next(inner.parameters())

        def to_model(w: CompactSD3BlockWeights) -> CompactSD3BlockWeights:  # the dense model's device, dtype
            kw = {k: (v if k in SD3_INDEX_FIELDS else v.detach().to(ref.device, ref.dtype))
                  for k, v in w.tensors().items()}
            return CompactSD3BlockWeights(**kw)

        like = [[to_model(w) for w in spec.blocks] for spec in stages]
        stage_cfgs = [{"name": s.name, "t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity),
                       "blocks": [{k: getattr(w, k).tolist() for k in SD3_INDEX_FIELDS} for w in s.blocks]}
                      for s in stages]
        layers, head_dim = len(inner.transformer_blocks), int(inner.config.attention_head_dim)
        shared, units = share_stages(share_sd3_producers, like, [head_dim] * layers, share_producers, stage_cfgs)
        config = {k: inner.config[k] for k in sd3.SD3_CONFIG_KEYS if k in inner.config}
        config["dual_attention_layers"] = list(config.get("dual_attention_layers") or ())
        with skip_weight_init():  # every weight is assigned below
            mosaic = cls(**config, stages=stage_cfgs, shared_producers=units, meta=meta,
                         dense_reference=cls.dense_reference_of(inner))
        mosaic.shared = skeleton_from_dense(inner)
        f = mosaic._facts
        if shared is None:
            for i, stage in enumerate(like):
                for j, w in enumerate(stage):
                    mosaic.stage_blocks[i][j] = CompactSD3Block(w, f["kinds"][j], head_dim, f["eps"], f["qk_eps"])
        else:
            mosaic.producer_storage = nn.ModuleList(store for store, _ in shared)
            for j, (store, per_stage) in enumerate(shared):
                for i, (ranges, consumers) in enumerate(per_stage):
                    mosaic.stage_blocks[i][j] = SharedSD3Block(store, ranges, consumers, head_dim, f["eps"],
                                                               f["qk_eps"])
        return mosaic.eval()

    # ------------------------------------------------------------------ properties

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | float | int | None = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ):
        r"""``SD3Transformer2DModel.forward`` with the stage picked from `timestep`.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, C_in, H, W)`): latent input.
            encoder_hidden_states (`torch.Tensor` of shape `(B, S, joint_attention_dim)`): the text states.
            pooled_projections (`torch.Tensor` of shape `(B, pooled_projection_dim)`): pooled text embeddings.
            timestep (`torch.Tensor` of shape `(B,)` or `()`, `int` or `float`): the sampler's timestep in
                [0, 1000) (SD3's pipeline: ``1000 * sigma``). A batch whose rows fall in several stages runs
                each stage on its rows.
            block_controlnet_hidden_states, skip_layers: not supported (None).
            joint_attention_kwargs (`dict`, *optional*): not supported beyond None or ``{}``.
            return_dict (`bool`, *optional*, defaults to True): return a ``Transformer2DModelOutput``.

        Returns:
            ``Transformer2DModelOutput(sample=(B, C_out, H, W))`` or ``(sample,)``.

        Raises:
            ValueError: missing inputs, a timestep outside every stage, inputs of the wrong shape.
            NotImplementedError: ControlNet residuals, skipped layers or attention kwargs.
        """
        if block_controlnet_hidden_states is not None:
            raise NotImplementedError("MosaicSD3 does not support block_controlnet_hidden_states (SD3 ControlNet); "
                                      "pass None")
        if skip_layers:
            raise NotImplementedError(f"MosaicSD3 does not support skip_layers (skip-layer guidance), got "
                                      f"{list(skip_layers)}; pass None")
        if joint_attention_kwargs:
            raise NotImplementedError(f"MosaicSD3 does not support joint_attention_kwargs (LoRA scale, IP-Adapter), "
                                      f"got keys {sorted(joint_attention_kwargs)}")
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        batch, device = int(hidden_states.shape[0]), hidden_states.device
        if torch.compiler.is_compiling():  # no host read: the stage is chosen in the graph
            out = run_stage_traced(self, timestep, batch, device, lambda stage, t: self.forward_stage(
                stage, hidden_states, t, encoder_hidden_states, pooled_projections))
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)
        groups = self.stage_rows(timestep, batch)  # one host read
        t_vec = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        call = (hidden_states, t_vec, encoder_hidden_states, pooled_projections)
        self.text_tokens = int(encoder_hidden_states.shape[1])
        p = int(self.config.patch_size)
        tokens = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)

        def run(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            args = call if rows is None else split_rows(call, rows, batch)
            self._notify_stage(stage, int(args[0].shape[0]), tokens, hidden_states.dtype, device)
            if self._graphs is not None:
                return self._graphs(stage, *args)
            return self.forward_stage(stage, *args)

        out = self.run_by_stage(groups, batch, run)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> None:
        """Shapes, dtype and device from metadata only (no device sync)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"MosaicSD3.forward: hidden_states must be (B, C, H, W), got {got}")
        c, p = int(self.config.in_channels), int(self.config.patch_size)
        B, channels, height, width = hidden_states.shape
        limit = int(self.config.pos_embed_max_size or 0) * p  # 0: positions for sample_size only, as diffusers
        if channels != c or height % p or width % p or (limit and max(height, width) > limit):
            raise ValueError(f"MosaicSD3.forward: hidden_states must be (B, {c}, H, W) with H, W multiples of "
                             f"patch_size={p}" + (f" up to {limit} (pos_embed_max_size * patch_size)" if limit else "")
                             + f", got {tuple(hidden_states.shape)}")
        if timestep is None:
            raise ValueError("MosaicSD3.forward: `timestep` is required (got None)")
        for name, value, tail in (("encoder_hidden_states", encoder_hidden_states, (None, "joint_attention_dim")),
                                  ("pooled_projections", pooled_projections, ("pooled_projection_dim",))):
            want = [int(self.config[t]) if t else None for t in tail]
            ok = isinstance(value, torch.Tensor) and value.dim() == 1 + len(tail) and value.shape[0] == B and \
                all(w is None or g == w for g, w in zip(value.shape[1:], want))
            if not ok:
                dims = ", ".join([str(B)] + ["S" if w is None else str(w) for w in want])
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise ValueError(f"MosaicSD3.forward: {name} must be ({dims}), got {got}")
        weight = self.shared.mod_weight
        if hidden_states.dtype != weight.dtype:
            raise TypeError(f"MosaicSD3.forward: hidden_states is {hidden_states.dtype} but the weights are "
                            f"{weight.dtype}; pass hidden_states.to(model.dtype)")
        if hidden_states.device != weight.device:
            raise ValueError(f"MosaicSD3.forward: hidden_states is on {hidden_states.device} but the model is on "
                             f"{weight.device}; move one of them")

    def forward_stage(self, stage: int, hidden_states: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        """The graph-capturable forward of one stage: tensors only, no host reads.

        Args:
            stage (`int`): the stage to run.
            hidden_states (`(B, C_in, H, W)`), timestep (`(B,)`), encoder_hidden_states (`(B, S,
                joint_attention_dim)`), pooled_projections (`(B, pooled_projection_dim)`): as `forward`.

        Returns:
            `torch.Tensor` of shape `(B, C_out, H, W)`.
        """
        from mosaic_kernels import ops

        sk, p = self.shared, int(self.config.patch_size)
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        # 1. Input: patchify + positions, temb, the projected text, every modulation (one GEMM).
        h = sk.pos_embed(hidden_states).contiguous()
        temb = sk.time_text_embed(timestep, pooled_projections)
        c = sk.context_embedder(encoder_hidden_states).contiguous()
        mods, final = sk.modulations(temb)
        final_norm = (final[:, 1], final[:, 0])  # AdaLayerNormContinuous: (scale, shift) rows
        blocks, eps = self.stage_blocks[stage], self._facts["eps"]
        # 2. Blocks of this stage, then the final layer's norm + modulation.
        if self.fuse_block_boundaries:  # each block hands the next its modulated norm1 (both streams)
            x = ops.ln_modulate(h, mods[0][0][:, 0], mods[0][0][:, 1], eps)
            xc = ops.ln_modulate(c, *blocks[0].context_norm(mods[0][1]), eps)
            for i, block in enumerate(blocks):
                last = i + 1 == len(blocks)
                nxt = final_norm if last else (mods[i + 1][0][:, 0], mods[i + 1][0][:, 1])
                nxt_c = None if last else blocks[i + 1].context_norm(mods[i + 1][1])
                h, x, c, xc = block.forward_normed(h, x, c, xc, *mods[i], next_norm=nxt, next_context_norm=nxt_c)
            h = x
        else:
            for i, block in enumerate(blocks):
                h, c = block(h, c, *mods[i])
            h = ops.ln_modulate(h, *final_norm, sk.norm_out_eps)
        # 3. Output: projection, unpatchify.
        h = sk.proj_out(h)
        c_out = h.shape[-1] // (p * p)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, height, width, p, p, c_out))
        return h.reshape(-1, c_out, height * p, width * p)

    #: Text tokens of the joint sequence for `stage_kernel_shapes` until a forward shows them (SD3's
    #: pipeline: 77 CLIP + 256 T5 tokens).
    text_tokens = 333

    def stage_kernel_shapes(self, stage: int, batch: int, tokens: int,
                            dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The kernel-op shapes of a stage's blocks (`StageRuntimeMixin.stage_kernel_shapes`): `tokens`
        image tokens, the text stream `text_tokens` long (the last forward's)."""
        C, S = self._facts["width"], int(self.text_tokens)
        rows = ((batch, tokens), (batch, S))
        items = {(op, (*r, C)) for op in ("ln_modulate", "gated_residual_ln_modulate") for r in rows}
        for b in self.stage_blocks[stage]:
            items |= {("attention", (batch, tokens + S, b.heads, b.head_dim)),
                      ("rms_norm_rope", (batch, tokens, b.heads, b.head_dim, 0)),
                      ("rms_norm_rope", (batch, S, b.heads, b.head_dim, 0)),
                      ("linear_gelu", (batch * tokens, b.mlp_width, C))}
            if b.kind.dual_attention:
                items |= {("attention", (batch, tokens, b.heads2, b.head_dim)),
                          ("rms_norm_rope", (batch, tokens, b.heads2, b.head_dim, 0)),
                          ("gated_residual", (batch, tokens, C))}
            if not b.kind.context_pre_only:
                items.add(("linear_gelu", (batch * S, b.context_mlp_width, C)))
            if not self.fuse_block_boundaries:
                items.add(("linear_gated_residual", (batch * tokens, C, b.mlp_width)))
                if not b.kind.context_pre_only:
                    items.add(("linear_gated_residual", (batch * S, C, b.context_mlp_width)))
        if self.config.qk_norm is None:
            items = {it for it in items if it[0] != "rms_norm_rope"}
        return [(op, shape, dtype) for op, shape in sorted(items)]

    # ------------------------------------------------------------------ memory, persistence

    def _memory_skeleton(self) -> nn.Module:
        return self.shared

    def extra_repr(self) -> str:
        return f"num_layers={self._facts['num_layers']}, width={self._facts['width']}, {super().extra_repr()}"

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        need = check_common_fields(cls, config, cfg_path, SD3_INDEX_FIELDS)
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
                    "joint_attention_dim", "pooled_projection_dim"):
            value = config.get(key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, "a positive integer", value)
        qk = config.get("qk_norm")
        need(qk in (None, "rms_norm"), "qk_norm", "null or 'rms_norm'", qk)
        shared = config.get("shared_producers")
        need(shared is None or isinstance(shared, list), "shared_producers", "null or a list", shared)
        for j, p in enumerate(shared or []):
            for key in KINDS:
                v = p.get(key) if isinstance(p, dict) else None
                need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                     f"shared_producers[{j}].{key}", "a list of integers", v)

"""The stage-switching PixArt: one shared skeleton, one set of compact blocks per stage.

`MosaicPixArt` is a diffusers model (``ModelMixin`` + ``ConfigMixin``) and a drop-in replacement for
``PixArtTransformer2DModel`` at inference: the same ``forward`` signature and output, and a config
holding the dense model's keys, so ``pipe.transformer = mosaic`` works in ``PixArtSigmaPipeline``
and ``PixArtAlphaPipeline`` with any scheduler. The sampler's timestep picks the stage (read once
per forward on the host). Everything pruning does not touch (patch embedding, ``adaln_single``,
caption projection, every block's ``scale_shift_table``, the final layer) is stored once; by
default (``mosaicdiff.prune``) each block position stores its producer rows once for all stages
(``producer_storage``, `mosaicdiff.families.pixart.producers`) and the stages only their
compensated consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from mosaicdiff.core.model import MosaicModel, skip_weight_init, split_rows
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.shared_producers import (
    KINDS,
    empty_shared_blocks,
    install_shared_blocks,
    share_stages,
)
from mosaicdiff.core.stages import StageSpec, checked_stage_configs
from mosaicdiff.core.tensor_cache import cached_for_tensor, tensor_key
from mosaicdiff.core.text_blocks import CrossKVCacheMixin
from mosaicdiff.core.traced_stages import run_stage_traced
from mosaicdiff.families.pixart import adapter as pixart
from mosaicdiff.families.pixart import lora as pixart_lora
from mosaicdiff.families.pixart.blocks import (
    PIXART_INDEX_FIELDS,
    CompactPixArtBlock,
    CompactPixArtBlockWeights,
    pixart_block_shapes,
)
from mosaicdiff.families.pixart.producers import (
    SharedPixArtBlock,
    share_pixart_producers,
)

logger = logging.getLogger(__name__)

__all__ = ["MosaicPixArt"]


def _text_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """diffusers' conversion of ``encoder_attention_mask``: a (B, S) keep-mask becomes the additive
    bias ``(1 - mask) * -10000`` (a (B, 1, S) bias is taken as is), shaped (B, 1, 1, S) for SDPA."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
    if mask.dim() != 3 or mask.shape[1] != 1:
        raise ValueError(f"MosaicPixArt.forward: encoder_attention_mask must be (B, S) (1 = keep) or (B, 1, S) "
                         f"(additive bias), got {tuple(mask.shape)}")
    return mask.to(dtype).unsqueeze(1)


class MosaicPixArt(CrossKVCacheMixin, MosaicModel):
    r"""A pruned PixArt-alpha/Sigma transformer whose blocks change with the denoising stage; a drop-in
    ``PixArtTransformer2DModel``.

    Build one with `mosaicdiff.prune` (`from_dense`) or `from_pretrained`; the constructor builds the
    model from its config with initialised weights (torch's defaults, as a diffusers constructor).

    Parameters:
        num_attention_heads ... attention_type: the dense ``PixArtTransformer2DModel`` config
            (`mosaicdiff.families.pixart.adapter.PIXART_CONFIG_KEYS`).
        stages (`list[dict]`): per stage ``name``, ``t_start``, ``t_end`` (exclusive), ``sparsity``
            and per block ``kept_heads1``, ``kept_heads2`` (self- / cross-attention heads) and
            ``kept_channels``; the ranges tile [0, 1000).
        shared_producers (`list[dict]`, *optional*): per block position the stored units in storage
            order (``heads1``, ``heads2``, ``channels``); each stage's kept lists are a contiguous
            run of them. None: every stage stores its own producers.
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
        >>> pipe.transformer.enable_cross_kv_cache()  # doctest: +SKIP
        >>> image = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
        ...              negative_prompt_attention_mask=neg_mask).images[0]  # doctest: +SKIP
    """

    #: Saved folders (`mosaicdiff.core.serialization`).
    format_name = "mosaicdiff.MosaicPixArt"
    format_version = "1.0"
    #: The dense model's config keys this mosaic's config repeats (`MosaicModel.dense_config`).
    dense_config_keys = pixart.PIXART_CONFIG_KEYS
    readable_majors = (1,)
    # diffusers model attributes (`MosaicModel.enable_layerwise_casting`, ``compile_repeated_blocks``):
    # PixArtTransformer2DModel's, its BasicTransformerBlock replaced by the compact blocks.
    _no_split_modules = ["CompactPixArtBlock", "SharedPixArtBlock", "PatchEmbed"]
    _skip_layerwise_casting_patterns = ["pos_embed", "adaln_single"]
    _repeated_blocks = ["CompactPixArtBlock", "SharedPixArtBlock"]
    #: Where a dense PixArt LoRA's linears live (`mosaicdiff.core.lora`).
    _lora_targets = pixart_lora.lora_targets

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        stages: list[dict] | None = None,
        shared_producers: list[dict] | None = None,
        dense_reference: dict | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        stages = checked_stage_configs("MosaicPixArt", stages, meta)
        self.shared, self._facts = pixart.skeleton_from_config(self.dense_config)
        layers = self._facts["num_layers"]
        for spec in stages:
            if len(spec["blocks"]) != layers:
                raise ValueError(f"MosaicPixArt: stage {spec['name']!r} has {len(spec['blocks'])} blocks, the model "
                                 f"{layers} (num_layers)")
        if shared_producers is None:
            self.producer_storage = None
            self.stage_blocks = nn.ModuleList(nn.ModuleList(self._empty_block(b) for b in s["blocks"]) for s in stages)
        else:
            self._empty_shared_blocks(stages, [dict(p) for p in shared_producers])
        self._init_stages(stages)
        self.eval()

    # ------------------------------------------------------------------ building

    def _empty_block(self, kept: dict) -> CompactPixArtBlock:
        f = self._facts
        idx = {k: torch.as_tensor(kept[k], dtype=torch.int64, device="cpu").reshape(-1) for k in PIXART_INDEX_FIELDS}
        limits = {"kept_heads1": f["heads"], "kept_heads2": f["heads"], "kept_channels": f["mlp_hidden"]}
        for key, limit in limits.items():
            values = idx[key].tolist()
            if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
                raise ValueError(f"MosaicPixArt: {key} must be unique indices in [0, {limit}), got {values}")
        shapes = pixart_block_shapes(*(idx[k].numel() for k in PIXART_INDEX_FIELDS), f["head_dim"], f["width"],
                                     f["text_width"])
        return CompactPixArtBlock(CompactPixArtBlockWeights(**idx, **{k: torch.empty(s) for k, s in shapes.items()}),
                                  f["head_dim"], f["eps"])

    def _empty_shared_blocks(self, stages: list[dict], shared_producers: list[dict]) -> None:
        f = self._facts
        facts = [(f["head_dim"], f["width"], f["text_width"])] * f["num_layers"]
        self.producer_storage, self.stage_blocks = empty_shared_blocks(
            "MosaicPixArt", stages, shared_producers, SharedPixArtBlock, facts, f["eps"],
            unit_limits=(f["heads"], f["heads"], f["mlp_hidden"]))

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicPixArt:
        """A mosaic of a dense PixArt and its pruned stages (the dense model is left unchanged; its
        un-pruned modules are copied once, its blocks not at all).

        Args:
            dense (`PixArtTransformer2DModel`): the dense model.
            stages (`list[StageSpec]`): contiguous timestep ranges, each with one
                `CompactPixArtBlockWeights` per block (converted to the dense model's device and dtype).
            source (`str`, *optional*): saved in ``meta["source"]``.
            meta (`dict`, *optional*): JSON-serialisable information saved with the model.
            share_producers (`bool`, *optional*): True: store every block position's producer rows
                once (the stages' kept sets must nest, as ``mosaicdiff.prune`` selects them); False:
                a copy per stage; None: share where the kept sets allow.

        Raises:
            ValueError: a PixArt variant the compact block does not compute, stages that do not fit,
                or ``share_producers=True`` with kept sets that cannot share one storage.
        """
        pixart.check_pixart(dense)
        inner = pixart.unwrap_model(dense)
        meta = {**(meta or {}), **({"source": source} if source else {})}
        ref = next(inner.parameters())

        def to_model(w: CompactPixArtBlockWeights) -> CompactPixArtBlockWeights:  # the dense model's device, dtype
            kw = {k: (v if k.startswith("kept_") else v.detach().to(ref.device, ref.dtype))
                  for k, v in w.tensors().items()}
            return CompactPixArtBlockWeights(**kw)

        like = [[to_model(w) for w in spec.blocks] for spec in stages]
        stage_cfgs = [{"name": s.name, "t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity),
                       "blocks": [{k: getattr(w, k).tolist() for k in PIXART_INDEX_FIELDS} for w in s.blocks]}
                      for s in stages]
        layers, head_dim = len(inner.transformer_blocks), int(inner.config.attention_head_dim)
        head_dims = [head_dim] * layers
        shared, units = share_stages(share_pixart_producers, like, head_dims, share_producers, stage_cfgs)
        config = {k: inner.config[k] for k in pixart.PIXART_CONFIG_KEYS if k in inner.config}
        with skip_weight_init():  # every weight is assigned below
            mosaic = cls(**config, stages=stage_cfgs, shared_producers=units, meta=meta,
                         dense_reference=cls.dense_reference_of(inner))
        mosaic.shared = pixart.skeleton_from_dense(inner)
        f = mosaic._facts
        if shared is None:
            for i, stage in enumerate(like):
                for j, w in enumerate(stage):
                    mosaic.stage_blocks[i][j] = CompactPixArtBlock(w, f["head_dim"], f["eps"])
        else:
            install_shared_blocks(mosaic, shared, SharedPixArtBlock, head_dims, f["eps"])
        return mosaic.eval()

    # ------------------------------------------------------------------ properties

    @property
    def use_additional_conditions(self) -> bool:
        """Whether ``adaln_single`` embeds resolution and aspect ratio (PixArt-alpha 1024)."""
        return bool(self.shared.adaln_single.emb.use_additional_conditions)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | float | int | None = None,
        added_cond_kwargs: dict[str, torch.Tensor | None] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        r"""``PixArtTransformer2DModel.forward`` with the stage picked from `timestep`.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, C_in, H, W)`): latent input.
            encoder_hidden_states (`torch.Tensor` of shape `(B, S, caption_channels)`): the text states.
            timestep (`torch.Tensor` of shape `(B,)` or `()`, `int` or `float`): the sampler's timestep
                (0..999). A batch whose rows fall in several stages runs each stage on its rows.
            added_cond_kwargs (`dict`, *optional*): ``resolution`` (B, 2) and ``aspect_ratio`` (B, 1)
                for a model with ``use_additional_conditions`` (else ignored, as in diffusers).
            cross_attention_kwargs, attention_mask: not supported (None).
            encoder_attention_mask (`torch.Tensor`, *optional*): (B, S) keep-mask of the text tokens
                (or diffusers' (B, 1, S) bias).
            return_dict (`bool`, *optional*, defaults to True): return a ``Transformer2DModelOutput``.

        Returns:
            ``Transformer2DModelOutput(sample=(B, C_out, H, W))`` or ``(sample,)``.

        Raises:
            ValueError: missing inputs, a timestep outside every stage, inputs of the wrong shape.
            NotImplementedError: ``attention_mask`` or ``cross_attention_kwargs``.
        """
        if cross_attention_kwargs:
            raise NotImplementedError(f"MosaicPixArt does not support cross_attention_kwargs, got keys "
                                      f"{sorted(cross_attention_kwargs)}")
        if attention_mask is not None:
            raise NotImplementedError("MosaicPixArt does not support a self-attention attention_mask (PixArt's "
                                      "pipelines pass none); pass encoder_attention_mask for the text tokens")
        self._check_inputs(hidden_states, encoder_hidden_states, timestep)
        added = added_cond_kwargs or {}
        if self.use_additional_conditions and (added.get("resolution") is None or added.get("aspect_ratio") is None):
            raise ValueError("MosaicPixArt.forward: this model uses additional conditions: added_cond_kwargs needs "
                             "'resolution' (B, 2) and 'aspect_ratio' (B, 1)")
        extra = (added.get("resolution"), added.get("aspect_ratio")) if self.use_additional_conditions else (None, None)
        batch, device = int(hidden_states.shape[0]), hidden_states.device
        if torch.compiler.is_compiling():  # no host read: the stage is chosen in the graph
            bias = _text_bias(encoder_attention_mask, hidden_states.dtype)
            out = run_stage_traced(self, timestep, batch, device, lambda stage, t: self.forward_stage(
                stage, hidden_states, t, encoder_hidden_states, bias, *extra))
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)
        groups = self.stage_rows(timestep, batch)  # one host read
        t_vec = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        call = (hidden_states, t_vec, encoder_hidden_states, _text_bias(encoder_attention_mask, hidden_states.dtype),
                *extra)
        p = int(self.config.patch_size)
        tokens = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)

        def run(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            args = call if rows is None else split_rows(call, rows, batch)
            self._notify_stage(stage, int(args[0].shape[0]), tokens, hidden_states.dtype, device)
            # a graph takes tensors only: the trailing optional inputs left out when absent
            n = len(args)
            while n > 3 and args[n - 1] is None:
                n -= 1
            if self._graphs is not None and all(a is not None for a in args[:n]):
                return self._graphs(stage, *args[:n])
            return self.forward_stage(stage, *args)

        out = self.run_by_stage(groups, batch, run)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep) -> None:
        """Shapes, dtype and device from metadata only (no device sync)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"MosaicPixArt.forward: hidden_states must be (B, C, H, W), got {got}")
        c, p = int(self.config.in_channels), int(self.config.patch_size)
        _, channels, height, width = hidden_states.shape
        if channels != c or height % p or width % p:
            raise ValueError(f"MosaicPixArt.forward: hidden_states must be (B, {c}, H, W) with H, W multiples of "
                             f"patch_size={p}, got {tuple(hidden_states.shape)}")
        if timestep is None:
            raise ValueError("MosaicPixArt.forward: `timestep` is required (got None)")
        width_t = self._facts["text_width"] if self.shared.caption_projection is None else \
            int(self.config.caption_channels)
        text = encoder_hidden_states
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != hidden_states.shape[0] \
                or text.shape[2] != width_t:
            got = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor) else \
                encoder_hidden_states
            raise ValueError(f"MosaicPixArt.forward: encoder_hidden_states must be ({hidden_states.shape[0]}, S, "
                             f"{width_t}) text states, got {got}")
        weight = self.shared.block_tables
        if hidden_states.dtype != weight.dtype:
            raise TypeError(f"MosaicPixArt.forward: hidden_states is {hidden_states.dtype} but the weights are "
                            f"{weight.dtype}; pass hidden_states.to(model.dtype)")
        if hidden_states.device != weight.device:
            raise ValueError(f"MosaicPixArt.forward: hidden_states is on {hidden_states.device} but the model is on "
                             f"{weight.device}; move one of them")

    def _text_states(self, encoder_hidden_states: torch.Tensor, batch: int) -> torch.Tensor:
        """The caption-projected text states, (B, S, T); once per run with the cross-attention k/v cache."""
        projection = self.shared.caption_projection
        if projection is None:
            return encoder_hidden_states

        def project() -> torch.Tensor:
            return projection(encoder_hidden_states).view(batch, -1, self._facts["text_width"])

        if not self._cross_kv_cache:
            return project()
        weight = projection.linear_1.weight
        key = (tensor_key(encoder_hidden_states), weight.data_ptr(), weight.dtype)
        return cached_for_tensor(self.__dict__, "_text_cache", encoder_hidden_states, key, project)

    def forward_stage(self, stage: int, hidden_states: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, text_bias: torch.Tensor | None = None,
                      resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-capturable forward of one stage: tensors only, no host reads.

        Args:
            stage (`int`): the stage to run.
            hidden_states (`torch.Tensor` of shape `(B, C_in, H, W)`), timestep (`(B,)`),
            encoder_hidden_states (`(B, S, caption_channels)`): as `forward`.
            text_bias (`torch.Tensor` of shape `(B, 1, 1, S)`, *optional*): the additive mask bias.
            resolution, aspect_ratio: the additional conditions (PixArt-alpha 1024), or None.

        Returns:
            `torch.Tensor` of shape `(B, C_out, H, W)`.
        """
        from mosaic_kernels import ops

        sk, p, C = self.shared, int(self.config.patch_size), self._facts["width"]
        B, height, width = hidden_states.shape[0], hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        # 1. Input: patchify + positions, the one adaLN-single output and the projected text.
        h = sk.pos_embed(hidden_states).contiguous()
        t_emb, emb = sk.adaln_single(timestep, {"resolution": resolution, "aspect_ratio": aspect_ratio},
                                     batch_size=B, hidden_dtype=h.dtype)
        text = self._text_states(encoder_hidden_states, B)
        tables = sk.block_tables  # (L, 6, C)
        # every block's gate_msa and gate_mlp (chunks 2 and 5, table rows added) at once, for the GEMM
        # epilogues: (L, 2, B, C); slices, not index lists (a list index would copy host to device: no graph)
        gates = (t_emb.view(B, 6, C)[:, 2::3].transpose(0, 1).unsqueeze(0) + tables[:, 2::3, None, :]).contiguous()
        final = (emb, emb, sk.scale_shift_table[0], sk.scale_shift_table[1], sk.norm_out_eps)
        blocks = self.stage_blocks[stage]
        # 2. Blocks of this stage, then the final layer's norm + modulation.
        if self.fuse_block_boundaries:  # each block hands the next its modulated norm1
            x = blocks[0].norm1(h, t_emb, tables[0])
            for i, block in enumerate(blocks):
                nxt = final if i + 1 == len(blocks) else \
                    (t_emb[:, :C], t_emb[:, C:2 * C], tables[i + 1][0], tables[i + 1][1], blocks[i + 1].eps)
                h, x = block.forward_normed(h, x, t_emb, tables[i], gates[i], text, text_bias, next_norm=nxt)
            h = x
        else:
            for i, block in enumerate(blocks):
                h = block(h, t_emb, tables[i], gates[i], text, text_bias)
            h = ops.ln_modulate_table(h, *final)
        # 3. Output: projection, unpatchify.
        h = sk.proj_out(h)
        c_out = h.shape[-1] // (p * p)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, height, width, p, p, c_out))
        return h.reshape(-1, c_out, height * p, width * p)

    # ------------------------------------------------------------------ runtime options

    # enable_cross_kv_cache (the caption projection is `_text_cache`), enable_cuda_graphs: `CrossKVCacheMixin`

    def stage_kernel_shapes(self, stage: int, batch: int, tokens: int,
                            dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The kernel-op shapes of a stage's blocks (`StageRuntimeMixin.stage_kernel_shapes`)."""
        C, M = self._facts["width"], batch * tokens
        items = {("ln_modulate_table", (batch, tokens, C)), ("gated_residual_ln_modulate_table", (batch, tokens, C))}
        for b in self.stage_blocks[stage]:
            h1, h2 = b.heads
            items |= {("attention", (batch, tokens, h1, b.head_dim)), ("linear_gelu", (M, b.mlp_width, C)),
                      ("linear_gated_residual", (M, C, h1 * b.head_dim)), ("linear_residual", (M, C, h2 * b.head_dim))}
            if not self.fuse_block_boundaries:
                items.add(("linear_gated_residual", (M, C, b.mlp_width)))
        return [(op, shape, dtype) for op, shape in sorted(items)]

    # ------------------------------------------------------------------ memory, persistence

    def _memory_skeleton(self) -> nn.Module:
        return self.shared

    def extra_repr(self) -> str:
        return f"num_layers={self._facts['num_layers']}, width={self._facts['width']}, {super().extra_repr()}"

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        need = check_common_fields(cls, config, cfg_path, PIXART_INDEX_FIELDS)
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size"):
            value = config.get(key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, "a positive integer", value)
        shared = config.get("shared_producers")
        need(shared is None or isinstance(shared, list), "shared_producers", "null or a list", shared)
        for j, p in enumerate(shared or []):
            for key in KINDS:
                v = p.get(key) if isinstance(p, dict) else None
                need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                     f"shared_producers[{j}].{key}", "a list of integers", v)

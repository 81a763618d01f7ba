"""The stage-switching MosaicDiT model: one shared skeleton, one set of compact blocks per stage.

`MosaicDiT` is a diffusers model (``ModelMixin`` + ``ConfigMixin``) and a drop-in replacement for
``DiTTransformer2DModel`` at inference: same ``forward`` signature and output, and its config
holds the dense DiT's architecture keys, so ``DiTPipeline(transformer=mosaic, vae=...,
scheduler=...)`` works unchanged. The config also describes every stage (range, sparsity, kept
heads and channels per block), so ``MosaicDiT.from_config(config)`` builds the whole skeleton and
one safetensors file fills it. The sampler's timestep (0..999) picks the stage, read once per
forward on the host (under ``torch.compile``, in the graph: `mosaicdiff.core.traced_stages`).
Everything pruning does not touch (patch embedding, one timestep/class embedder, the adaLN linears
of all blocks as one batched matrix, the final layer) is stored once and shared by every stage;
the stages hold only their compact block weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from mosaicdiff.core.block_cache import MosaicCacheMixin
from mosaicdiff.core.config_fields import FieldChecker, check_stage_fields
from mosaicdiff.core.model import MosaicModel, skip_weight_init
from mosaicdiff.core.stages import NUM_TRAIN_TIMESTEPS, StageSpec
from mosaicdiff.core.traced_stages import run_stage_traced
from mosaicdiff.families.dit import adapter as dit
from mosaicdiff.families.dit import build as mosaic_build
from mosaicdiff.families.dit import inputs as mosaic_inputs
from mosaicdiff.families.dit import legacy_format
from mosaicdiff.families.dit import lora as dit_lora
from mosaicdiff.families.dit.adapter import DIT_CONFIG_KEYS
from mosaicdiff.families.dit.config_checks import check_config_fields, check_dense_fields, check_stage_layout

logger = logging.getLogger(__name__)

__all__ = ["MosaicDiT"]

class MosaicDiT(MosaicCacheMixin, MosaicModel):
    r"""A pruned DiT whose blocks change with the denoising stage; a drop-in ``DiTTransformer2DModel``.

    Build one with `from_dense` (from a dense model and pruned stages), `from_dense_unpruned` or
    `from_pretrained`; the constructor takes the config and builds the model with initialised
    weights (torch's defaults, as a diffusers constructor; `mosaicdiff.core.weight_init.init_weights`).

    Parameters:
        num_attention_heads ... norm_eps: the dense ``DiTTransformer2DModel`` config (`DIT_CONFIG_KEYS`).
        stages (`list[dict]`): per stage ``name``, ``t_start``, ``t_end`` (exclusive),
            ``sparsity`` and ``blocks``: one ``{"kept_heads": [...], "kept_channels": [...]}``
            per block. Ranges are contiguous and non-overlapping.
        shared_embedder (`bool`): one timestep/class embedder for all blocks (they were identical).
        shared_producers (`list[dict]`, *optional*): per block position the ``heads`` and
            ``channels`` whose producer rows (qkv, fc1) are stored once for every stage, in
            storage order; each stage's kept lists are then a contiguous run of them
            (`mosaicdiff.families.dit.producers`). None: every stage stores its own producers.
        dense_reference (`dict`): ``params``, ``bytes`` and ``dtype`` of the dense model (`memory_report`).
        meta (`dict`): JSON-serialisable information about how the mosaic was made (method,
            boundaries, target sparsity, source, ...).

    Raises:
        ValueError: if the stages are empty, overlap, leave a gap, or do not fit the architecture;
            a dense key of the wrong type or value (``activation_fn`` other than
            ``"gelu-approximate"``, ``norm_type`` other than ``"ada_norm_zero"``, a dimension that is
            not a positive integer, ...: the field named).
        TypeError: if ``meta`` is not JSON-serialisable.

    Examples:
        >>> from mosaicdiff.families.dit.model import MosaicDiT
        >>> mosaic = MosaicDiT.from_dense_unpruned(pipe.transformer)  # doctest: +SKIP
        >>> pipe.transformer = mosaic  # doctest: +SKIP
        >>> images = pipe(class_labels=[207], num_inference_steps=25).images  # doctest: +SKIP
    """

    #: Saved folders (`mosaicdiff.core.serialization`). 3.0: ``shared_producers`` (qkv/fc1 rows
    #: stored once per block position, under "producer_storage.<j>.*"); 2.0: a diffusers config;
    #: 1.1 added ``weights_id``; 1.x folders are upgraded (`mosaicdiff.families.dit.legacy_format`).
    format_name = "mosaicdiff.MosaicDiT"
    format_version = "3.0"
    #: The dense model's config keys this mosaic's config repeats (`MosaicModel.dense_config`).
    dense_config_keys = DIT_CONFIG_KEYS
    readable_majors = (1, 2, 3)
    # diffusers model attributes (`MosaicModel.enable_layerwise_casting`, ``compile_repeated_blocks``):
    # the blocks are never split across devices; the patch embedding and the conditioning (embedder
    # + adaLN matrix, which diffusers' DiT keeps uncast as its blocks' ``norm1``) stay uncast (the
    # mosaic has no norm weights: diffusers' default "norm" pattern has nothing to match).
    _no_split_modules = ["CompactDiTBlock", "SharedProducerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "conditioning"]
    _repeated_blocks = ["CompactDiTBlock", "SharedProducerBlock"]
    #: The config fields that set each tensor's shape (loading errors name them).
    shape_fields = (
        ("shared.pos_embed.pos_embed", ("sample_size", "patch_size", "num_attention_heads", "attention_head_dim")),
        ("shared.pos_embed.", ("num_attention_heads", "attention_head_dim", "in_channels", "patch_size")),
        ("shared.conditioning.embedders.", ("num_attention_heads", "attention_head_dim", "num_embeds_ada_norm")),
        ("shared.conditioning.", ("num_layers", "num_attention_heads", "attention_head_dim")),
        ("shared.proj_out_1.", ("num_attention_heads", "attention_head_dim")),
        ("shared.proj_out_2.", ("num_attention_heads", "attention_head_dim", "patch_size", "out_channels")),
        ("", ("num_attention_heads", "attention_head_dim", "stages", "shared_producers")),
    )
    #: `mosaicdiff.sample` hands this model its timesteps as CPU tensors (see `mosaic_inputs.select_stages`).
    accepts_host_timestep = True
    #: Where a dense DiT LoRA's linears live (`mosaicdiff.core.lora`).
    _lora_targets = dit_lora.lora_targets

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        stages: list[dict] | None = None,
        shared_embedder: bool = True,
        dense_reference: dict | None = None,
        meta: dict | None = None,
        shared_producers: list[dict] | None = None,
    ):
        super().__init__()
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise TypeError(f"MosaicDiT: meta must be JSON-serialisable, got {meta!r} ({exc})") from None
        need = FieldChecker("MosaicDiT")  # a bad field in one line, not an error deep in diffusers' build
        check_dense_fields(self.dense_config, need)
        stages = list(stages or [])
        # an empty list: the stage checks below say it in their words
        check_stage_fields(stages, need, ("kept_heads", "kept_channels"), nonempty=False)
        skeleton, facts = dit.skeleton_from_config(self.dense_config, bool(shared_embedder))
        check_stage_layout(stages, int(num_layers), facts["num_heads"], facts["mlp_hidden"])
        self._facts = {"num_layers": int(num_layers), **facts, "shared_embedder": bool(shared_embedder)}
        self.shared = skeleton
        self.producer_storage, self.stage_blocks = mosaic_build.empty_stage_blocks(self._facts, stages,
                                                                               shared_producers)
        self._init_stages(stages)
        self.eval()

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicDiT:
        """A mosaic of a dense DiT and its pruned stages.

        Args:
            dense (`DiTTransformer2DModel`): the dense model. Its un-pruned modules are copied once
                into the shared skeleton; its blocks are not kept.
            stages (`list[StageSpec]`): contiguous, non-overlapping timestep ranges, each with one
                `CompactBlockWeights` per block. Their tensors are converted to the dense model's
                device and dtype (no copy when they already match).
            source (`str`, *optional*): identifier of the source model, saved in ``meta["source"]``.
            meta (`dict`, *optional*): JSON-serialisable information saved with the model.
            share_producers (`bool`, *optional*): store every block position's producer rows
                (qkv, fc1) once for all stages (`mosaicdiff.families.dit.producers`): True requires it,
                False stores a copy per stage, None (default) shares when the stages' kept sets
                allow it (`mosaicdiff.method.producer_layout.interval_order`; `mosaicdiff.prune` chooses
                them so that they do). Outputs are the same either way.

        Raises:
            ValueError: if ``dense`` is not an adaLN-Zero DiT, or the stages are empty, overlap,
                leave a gap, or their blocks do not fit the dense model; ``share_producers=True``
                with kept sets that cannot share one storage.
            NotImplementedError: a DiT variant the compact block does not compute.
            TypeError: if ``meta`` is not JSON-serialisable or a stage is not a `StageSpec`.
        """
        dit.validate_dit(dense)
        dit.check_block_math(dense)
        inner = dit.unwrap_model(dense)
        meta = dict(meta or {})
        if source is not None:
            meta["source"] = source
        skeleton = dit.skeleton_from_dense(inner)
        plan = mosaic_build.plan_from_dense(inner, skeleton, stages, share_producers)
        config = {k: inner.config[k] for k in DIT_CONFIG_KEYS if k in inner.config}
        with skip_weight_init():  # every weight is assigned below
            mosaic = cls(**config, stages=plan.stage_configs, shared_embedder=skeleton.conditioning.shared_embedder,
                         meta=meta, dense_reference=plan.dense_reference, shared_producers=plan.shared_producers)
        mosaic.shared = skeleton
        mosaic.producer_storage, mosaic.stage_blocks = mosaic_build.filled_stage_blocks(mosaic._facts, plan)
        mosaic.eval()
        logger.debug("MosaicDiT from %s: %d blocks, %d stages, shared embedder=%s", type(inner).__name__,
                     len(inner.transformer_blocks), mosaic.num_stages, skeleton.conditioning.shared_embedder)
        return mosaic

    @classmethod
    def from_dense_unpruned(cls, dense: nn.Module, *, source: str | None = None) -> MosaicDiT:
        """One stage over [0, 1000) keeping every head and channel (sparsity 0): the "engine dense".

        Returns:
            `MosaicDiT` computing the dense model's output through the runtime's kernels.
        """
        heads = dit.model_num_heads(dense)
        blocks = [dit.dense_block_weights(b, heads) for b in dit.transformer_blocks(dense)]
        stage = StageSpec("dense", 0, NUM_TRAIN_TIMESTEPS, 0.0, blocks)
        return cls.from_dense(dense, [stage], source=source, meta={"method": "unpruned"})

    # ------------------------------------------------------------------ properties

    @property
    def runtime_info(self) -> dict[str, Any]:
        """Shapes and epsilons the blocks were built with (copy)."""
        return dict(self._facts)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int | None = None,
        class_labels: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        r"""Denoise ``hidden_states`` with the stage selected by ``timestep``.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, C_in, H, W)`): latent input.
            timestep (`torch.Tensor` of shape `(B,)` or `()`, `int` or `float`): the sampler's
                timestep (0..999 scale). A batch whose rows fall in several stages (a server
                batching requests at different steps) runs each stage on its rows.
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids (the null class for CFG).
            cross_attention_kwargs (`dict`, *optional*): not supported; must be None or empty.
            return_dict (`bool`, *optional*, defaults to True): return a
                ``Transformer2DModelOutput`` instead of a tuple.

        Returns:
            ``Transformer2DModelOutput(sample=(B, C_out, H, W))`` or ``(sample,)``.

        Raises:
            ValueError: missing timestep or labels, a timestep outside every stage,
                ``hidden_states`` with the wrong channel count, a height or width that is not a
                multiple of ``patch_size``, on another device than the weights, or class labels
                out of range (checked when they are on the CPU: checking device labels would
                cost a sync per forward).
            TypeError: ``hidden_states`` of another dtype than the weights (no silent cast, as in
                diffusers; cast with ``hidden_states.to(model.dtype)``), or float labels.
        """
        if cross_attention_kwargs:
            raise NotImplementedError(
                f"MosaicDiT does not support cross_attention_kwargs, got keys {sorted(cross_attention_kwargs)}"
            )
        mosaic_inputs.check_hidden_states(self, hidden_states)
        batch, device = hidden_states.shape[0], hidden_states.device
        if torch.compiler.is_compiling():  # no host read: the stage is chosen in the graph
            labels = mosaic_inputs.class_labels_traced(class_labels, batch, device)
            output = run_stage_traced(self, timestep, batch, device,
                                      lambda stage, t: self.forward_stage(stage, hidden_states, t, labels))
            return Transformer2DModelOutput(sample=output) if return_dict else (output,)
        # 1. Stages (one host read) and inputs.
        groups, t_vec = mosaic_inputs.select_stages(self, timestep, batch, device)
        labels = mosaic_inputs.class_labels_tensor(self, class_labels, batch, device)
        p = int(self.config.patch_size)
        tokens = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)

        # 2. Stage forward per stage present: CUDA graph replay where enabled and possible, else eager.
        def run(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            args = (hidden_states, t_vec, labels) if rows is None else \
                tuple(a[rows.to(device)] for a in (hidden_states, t_vec, labels))
            self._notify_stage(stage, int(args[0].shape[0]), tokens, hidden_states.dtype, device)
            if self._graphs is not None:
                return self._graphs(stage, *args)
            return self.forward_stage(stage, *args)

        output = self.run_by_stage(groups, batch, run)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def forward_stage(
        self, stage: int, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """The graph-capturable part of ``forward``: no host reads, fixed stage.

        Args:
            stage (`int`): index of the stage to run.
            hidden_states (`torch.Tensor` of shape `(B, C_in, H, W)`): latent input.
            timestep (`torch.Tensor` of shape `(B,)`): timesteps (any real dtype).
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids.

        Returns:
            `torch.Tensor` of shape `(B, C_out, H, W)`.
        """
        from mosaic_kernels import ops

        p = int(self.config.patch_size)
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        sk = self.shared
        # 1. Input: patchify + positions, then the conditioning of every block at once.
        h = sk.pos_embed(hidden_states).contiguous()
        emb, mods = sk.conditioning(timestep, class_labels, hidden_dtype=h.dtype)
        shift, scale = (m.contiguous() for m in sk.proj_out_1(F.silu(emb)).chunk(2, dim=1))
        final_norm = (shift, scale, sk.norm_out_eps)
        blocks = self.stage_blocks[stage]
        # 2. Blocks of this stage, then the final adaLN norm.
        if self.fuse_block_boundaries:
            # each block hands the next one its modulated norm: one pass over h per boundary
            x = ops.ln_modulate(h, mods[0][0], mods[0][1], blocks[0].eps)
            for i, (block, mod) in enumerate(zip(blocks, mods)):
                nxt = (mods[i + 1][0], mods[i + 1][1], blocks[i + 1].eps) if i + 1 < len(blocks) else final_norm
                h, x = block.forward_normed(h, x, mod, nxt)
            h = x
        else:
            for block, mod in zip(blocks, mods):
                h = block(h, mod)
            h = ops.ln_modulate(h, *final_norm)
        # 3. Output: projection, unpatchify.
        h = sk.proj_out_2(h)
        c_out = h.shape[-1] // (p * p)
        h = h.reshape(-1, height, width, p, p, c_out)
        h = torch.einsum("nhwpqc->nchpwq", h)
        return h.reshape(-1, c_out, height * p, width * p)

    def stage_kernel_shapes(self, stage: int, batch: int, tokens: int,
                            dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The kernel-op shapes of a stage's blocks (`StageRuntimeMixin.stage_kernel_shapes`)."""
        C, M = self.runtime_info["width"], batch * tokens
        items = {("ln_modulate", (batch, tokens, C)), ("gated_residual_ln_modulate", (batch, tokens, C))}
        for b in self.stage_blocks[stage]:
            if b.num_heads:
                items.add(("attention", (batch, tokens, b.num_heads, b.head_dim)))
            if b.mlp_width:
                items.add(("linear_gelu", (M, b.mlp_width, C)))
                if not self.fuse_block_boundaries:  # fused: fc2 is a plain GEMM before the fused norm
                    items.add(("linear_gated_residual", (M, C, b.mlp_width)))
            elif not self.fuse_block_boundaries:
                items.add(("gated_residual", (batch, tokens, C)))
        return [(op, shape, dtype) for op, shape in sorted(items)]

    # ------------------------------------------------------------------ memory, repr, persistence

    def _memory_skeleton(self) -> nn.Module:
        return self.shared

    def _dense_params_dedup(self, dense: dict[str, Any]) -> int:
        """The dense DiT with one timestep/class embedder instead of one per block (diffusers' port
        stores 28 identical copies)."""
        if not dense.get("params"):
            return 0
        embedder = dense.get("embedder_params")
        if embedder is None:  # saved before the field existed: the skeleton's own embedder
            embedder = sum(p.numel() for p in self.shared.conditioning.embedders[0].parameters())
        copies = self._facts["num_layers"] - 1 if self.shared.conditioning.shared_embedder else 0
        return int(dense["params"]) - copies * int(embedder)

    def extra_repr(self) -> str:
        return f"num_layers={self._facts['num_layers']}, width={self._facts['width']}, {super().extra_repr()}"

    @classmethod
    def upgrade_saved_config(cls, config: dict[str, Any], cfg_path, major: int) -> dict[str, Any]:
        return legacy_format.upgrade_config(config, cfg_path) if major == 1 else config

    @classmethod
    def upgrade_saved_tensors(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return legacy_format.upgrade_keys(tensors) if config.get("_legacy") else tensors

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        check_config_fields(cls, config, cfg_path)

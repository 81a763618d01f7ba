"""The stage-switching MosaicDiT model: one shared skeleton, one set of compact blocks per stage.

`MosaicDiT` is a drop-in replacement for diffusers' ``DiTTransformer2DModel`` at inference: same
``forward`` signature and output, same ``config`` object, so ``DiTPipeline(transformer=mosaic,
vae=..., scheduler=...)`` works unchanged. The sampler's timestep (0..999) picks the stage, read
once per forward on the host. Everything pruning does not touch (patch embedding, one
timestep/class embedder, the adaLN linears of all blocks as one batched matrix, the final layer)
is stored once and shared by every stage; the stages hold only their compact block weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosaicdiff.blocks import CompactDiTBlock, SharedConditioning
from mosaicdiff.types import CompactBlockWeights, StageSpec

logger = logging.getLogger(__name__)

__all__ = ["MosaicDiT", "SharedSkeleton"]

#: Default trajectory range [0, NUM_TRAIN_TIMESTEPS) covered by `MosaicDiT.from_dense_unpruned`.
NUM_TRAIN_TIMESTEPS = 1000


def _transformer_output_cls():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput


def _frozen_config(config: dict):
    """A diffusers ``FrozenDict`` (attribute access, as ``model.config``) from a plain dict."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


class SharedSkeleton(nn.Module):
    r"""The un-pruned parameters of a DiT, stored once and shared by every stage.

    Parameters:
        pos_embed (`nn.Module`): diffusers' ``PatchEmbed`` (patchify conv + sin-cos positions).
        conditioning (`SharedConditioning`): embedder(s) and the batched adaLN matrix.
        proj_out_1 (`nn.Linear`): final-layer modulation linear ``C -> 2C``.
        proj_out_2 (`nn.Linear`): final projection ``C -> p*p*out_channels``.
        norm_out_eps (`float`): epsilon of the final LayerNorm (no affine).
    """

    def __init__(
        self,
        pos_embed: nn.Module,
        conditioning: SharedConditioning,
        proj_out_1: nn.Linear,
        proj_out_2: nn.Linear,
        norm_out_eps: float = 1e-6,
    ):
        super().__init__()
        self.pos_embed = pos_embed
        self.conditioning = conditioning
        self.proj_out_1 = proj_out_1
        self.proj_out_2 = proj_out_2
        self.norm_out_eps = float(norm_out_eps)
        for p in self.parameters():
            p.requires_grad_(False)


class MosaicDiT(nn.Module):
    r"""A pruned DiT whose blocks change with the denoising stage; a drop-in ``DiTTransformer2DModel``.

    Parameters:
        dense (`DiTTransformer2DModel`): the dense model the stages were pruned from. Its
            un-pruned modules are copied once into the shared skeleton; its blocks are not kept.
        stages (`list[StageSpec]`): contiguous, non-overlapping timestep ranges, each with one
            `CompactBlockWeights` per block. Their tensors are converted to the dense model's
            device and dtype (no copy when they already match).
        source (`str`, *optional*): identifier of the source model (hub id or path), saved in
            ``meta["source"]``.
        meta (`dict`, *optional*): JSON-serialisable information about how the mosaic was made
            (method, boundaries, target sparsity, ...), saved with the model.

    Raises:
        ValueError: if ``dense`` is not an adaLN-Zero DiT, the stages are empty, overlap, leave a
            gap, or their blocks do not fit the dense model.
        TypeError: if ``meta`` is not JSON-serialisable.

    Examples:
        >>> from mosaicdiff.mosaic import MosaicDiT
        >>> mosaic = MosaicDiT.from_dense_unpruned(pipe.transformer)  # doctest: +SKIP
        >>> pipe.transformer = mosaic  # doctest: +SKIP
        >>> images = pipe(class_labels=[207], num_inference_steps=25).images  # doctest: +SKIP
    """

    def __init__(
        self,
        dense: nn.Module,
        stages: Sequence[StageSpec],
        *,
        source: str | None = None,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        from mosaicdiff.integrations.diffusers_dit import (
            block_linears,
            embedders_identical,
            validate_dit,
        )

        validate_dit(dense)
        _check_block_math(dense)
        blocks = list(dense.transformer_blocks)
        identical = bool(embedders_identical(dense))
        if identical:
            embedders: list[nn.Module] = [copy.deepcopy(blocks[0].norm1.emb)]
        else:
            embedders = [copy.deepcopy(b.norm1.emb) for b in blocks]
        conditioning = SharedConditioning.from_blocks(
            embedders,
            [b.norm1.linear.weight for b in blocks],
            [b.norm1.linear.bias for b in blocks],
        )
        skeleton = SharedSkeleton(
            pos_embed=copy.deepcopy(dense.pos_embed),
            conditioning=conditioning,
            proj_out_1=copy.deepcopy(dense.proj_out_1),
            proj_out_2=copy.deepcopy(dense.proj_out_2),
            norm_out_eps=dense.norm_out.eps,
        )
        params = list(dense.parameters())
        runtime = {
            "num_layers": len(blocks),
            "width": int(dense.config.num_attention_heads * dense.config.attention_head_dim),
            "num_heads": int(dense.config.num_attention_heads),
            "head_dim": int(dense.config.attention_head_dim),
            "mlp_hidden": int(block_linears(blocks[0])["fc1"].out_features),
            "attn_norm_eps": float(blocks[0].norm1.norm.eps),
            "mlp_norm_eps": float(blocks[0].norm3.eps),
            "shared_embedder": identical,
        }
        dense_ref = {
            "params": int(sum(p.numel() for p in params)),
            "bytes": int(sum(p.numel() * p.element_size() for p in params)),
            "dtype": str(params[0].dtype).removeprefix("torch."),
        }
        self._setup(dense.config, skeleton, stages, runtime, dense_ref, source, meta)
        logger.debug(
            "MosaicDiT from %s: %d blocks, %d stages, shared embedder=%s",
            type(dense).__name__, len(blocks), len(self._stage_meta), identical,
        )

    # ------------------------------------------------------------------ construction

    def _setup(
        self,
        config,
        skeleton: SharedSkeleton,
        stages: Sequence[StageSpec],
        runtime: dict[str, Any],
        dense_ref: dict[str, Any],
        source: str | None,
        meta: dict[str, Any] | None,
    ) -> None:
        """Common construction from a skeleton (used by ``__init__`` and ``from_pretrained``)."""
        meta = dict(meta or {})
        if source is not None:
            meta["source"] = source
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise TypeError(f"MosaicDiT: meta must be JSON-serialisable, got {meta!r} ({exc})") from None
        stages = list(stages)
        _check_stages(stages, runtime)
        self.config = config
        self._runtime = dict(runtime)
        self._dense_ref = dict(dense_ref)
        self.meta = meta
        self.shared = skeleton
        ref = skeleton.conditioning.mod_weight
        self.stage_blocks = nn.ModuleList()
        for spec in stages:
            self.stage_blocks.append(nn.ModuleList(
                CompactDiTBlock(
                    _to_like(w, ref), runtime["head_dim"], runtime["attn_norm_eps"], runtime["mlp_norm_eps"],
                )
                for w in spec.blocks
            ))
        self._stage_meta = [(s.name, int(s.t_start), int(s.t_end), float(s.sparsity)) for s in stages]
        self._graphs = None
        self._last_stage_key = None
        self.fuse_block_boundaries = True
        self.on_stage_change: Callable[[int, str], None] | None = None
        self.eval()

    @classmethod
    def from_dense_unpruned(cls, dense: nn.Module, *, source: str | None = None) -> MosaicDiT:
        """One stage over [0, 1000) keeping every head and channel (sparsity 0): the "engine dense".

        Args:
            dense (`DiTTransformer2DModel`): the dense model.
            source (`str`, *optional*): identifier of the source model.

        Returns:
            `MosaicDiT` computing the dense model's output through the runtime's kernels.
        """
        from mosaicdiff.integrations.diffusers_dit import dense_block_weights

        heads = int(dense.config.num_attention_heads)
        blocks = [dense_block_weights(b, heads) for b in dense.transformer_blocks]
        stage = StageSpec("dense", 0, NUM_TRAIN_TIMESTEPS, 0.0, blocks)
        return cls(dense, [stage], source=source, meta={"method": "unpruned"})

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (as ``ModelMixin.dtype``)."""
        return self.shared.conditioning.mod_weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights (as ``ModelMixin.device``)."""
        return self.shared.conditioning.mod_weight.device

    @property
    def num_stages(self) -> int:
        return len(self._stage_meta)

    @property
    def stages(self) -> list[StageSpec]:
        """The stages, their blocks' tensors being this module's (no copy)."""
        return [
            StageSpec(name, t0, t1, sp, [b.weights() for b in self.stage_blocks[i]])
            for i, (name, t0, t1, sp) in enumerate(self._stage_meta)
        ]

    @property
    def runtime_info(self) -> dict[str, Any]:
        """Shapes and epsilons the blocks were built with (copy)."""
        return dict(self._runtime)

    def stage_for(self, t: float | int | torch.Tensor) -> int:
        """Index of the stage whose range ``[t_start, t_end)`` contains timestep ``t``.

        Args:
            t (`float`, `int` or a one-element `torch.Tensor`): a timestep on the 0..999 scale.

        Returns:
            `int`: index into `stages`.

        Raises:
            ValueError: if no stage contains ``t``.
        """
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(f"stage_for expects one timestep, got a tensor of shape {tuple(t.shape)}")
            t = t.item()
        t = float(t)
        for i, (_, t0, t1, _) in enumerate(self._stage_meta):
            if t0 <= t < t1:
                return i
        ranges = ", ".join(f"{n}[{a},{b})" for n, a, b, _ in self._stage_meta)
        raise ValueError(f"timestep {t:g} is outside every stage: {ranges}")

    # ------------------------------------------------------------------ forward

    #: `mosaicdiff.sample` hands this model its timesteps as CPU tensors (see `_select`).
    accepts_host_timestep = True

    @torch.compiler.disable
    def _select(self, timestep, batch: int, device: torch.device) -> tuple[int, torch.Tensor]:
        """Read the timestep on the host once; return the stage and a (B,) float32 device tensor.

        A Python number or a CPU tensor (the scheduler's own timesteps) costs no device sync: the
        stage is read on the host and the device vector is a fill (one value) or an async copy.
        A device tensor (what ``DiTPipeline`` passes) must be read back: one sync per forward.
        """
        if timestep is None:
            raise ValueError("MosaicDiT.forward: `timestep` is required (got None)")
        if isinstance(timestep, torch.Tensor):
            t = timestep.detach()
            if not (t.numel() == 1 or (t.dim() == 1 and t.numel() == batch)):
                raise ValueError(
                    f"MosaicDiT.forward: timestep must be a number, a 0-d tensor or a ({batch},) "
                    f"tensor, got shape {tuple(t.shape)}"
                )
            values = t.reshape(-1).double()
            lo, hi = (float(v) for v in torch.stack(torch.aminmax(values)).tolist())  # host read
            if lo == hi:  # one timestep for the whole batch (every sampler): a fill, no copy
                t_vec = torch.full((batch,), lo, dtype=torch.float32, device=device)
            else:
                t_vec = t.reshape(-1).to(dtype=torch.float32).to(device, non_blocking=True)
        elif isinstance(timestep, (int, float)) or hasattr(timestep, "__float__"):
            lo = hi = float(timestep)
            t_vec = torch.full((batch,), lo, dtype=torch.float32, device=device)
        else:
            raise TypeError(f"MosaicDiT.forward: unsupported timestep type {type(timestep).__name__}")
        stage = self.stage_for(lo)
        if hi != lo and self.stage_for(hi) != stage:
            names = (self._stage_meta[stage][0], self._stage_meta[self.stage_for(hi)][0])
            raise ValueError(
                f"MosaicDiT.forward: the batch mixes timesteps of stages {names[0]!r} and {names[1]!r} "
                f"(min t={lo:g}, max t={hi:g}); run one stage per call"
            )
        return stage, t_vec

    @torch.compiler.disable
    def _labels(self, class_labels, batch: int, device: torch.device) -> torch.Tensor:
        """Labels as a (B,) int64 device tensor; range-checked while they are still on the host."""
        if class_labels is None:
            raise ValueError("MosaicDiT.forward: `class_labels` is required (got None)")
        labels = torch.as_tensor(class_labels).reshape(-1)  # lists and ints stay on the host
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"MosaicDiT.forward: class_labels must be integers, got {labels.dtype}")
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(
                f"MosaicDiT.forward: class_labels must have {batch} entries, got {labels.numel()}"
            )
        # Host labels cost nothing to check; device labels would cost a sync per forward, so they
        # are not checked (an out-of-range one fails in the embedding lookup, as in diffusers).
        if labels.device.type == "cpu":
            rows = self._num_label_rows()
            lo, hi = (int(v) for v in torch.aminmax(labels))
            if lo < 0 or hi >= rows:
                null = int(self.config.num_embeds_ada_norm)
                valid = f"[0, {null}) or the null class {null}" if rows > null else f"[0, {rows})"
                raise ValueError(
                    f"MosaicDiT.forward: class_labels must be class ids in {valid}, got "
                    f"{lo if lo < 0 else hi}"
                )
        return labels.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()

    def _num_label_rows(self) -> int:
        """Rows of the class embedding table: the classes, plus the null class when CFG-trained."""
        emb = self.shared.conditioning.embedders[0]
        table = getattr(getattr(emb, "class_embedder", None), "embedding_table", None)
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings)
        return int(self.config.num_embeds_ada_norm) + 1

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        """Shape, dtype and device against the model, from metadata only (no device sync)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
            is_tensor = isinstance(hidden_states, torch.Tensor)
            shape = tuple(hidden_states.shape) if is_tensor else type(hidden_states).__name__
            raise ValueError(f"MosaicDiT.forward: hidden_states must be (B, C, H, W), got {shape}")
        channels, p = int(self.config.in_channels), int(self.config.patch_size)
        _, c, h, w = hidden_states.shape
        if c != channels:
            raise ValueError(
                f"MosaicDiT.forward: hidden_states has {c} channels but the model expects "
                f"in_channels={channels} (shape (B, {channels}, H, W))"
            )
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"MosaicDiT.forward: hidden_states height and width must be positive multiples of "
                f"patch_size={p}, got {h}x{w} (the model was trained at {self.config.sample_size})"
            )
        if hidden_states.dtype != self.dtype:
            raise TypeError(
                f"MosaicDiT.forward: hidden_states is {hidden_states.dtype} but the model's weights are "
                f"{self.dtype}; pass hidden_states.to(model.dtype) (DiTTransformer2DModel does not cast "
                f"either; DiTPipeline and mosaicdiff.sample do it for you)"
            )
        if hidden_states.device != self.device:
            raise ValueError(
                f"MosaicDiT.forward: hidden_states is on {hidden_states.device} but the model is on "
                f"{self.device}; move one of them"
            )

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
                timestep (0..999 scale); all entries must fall in one stage.
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids (the null class for CFG).
            cross_attention_kwargs (`dict`, *optional*): not supported; must be None or empty.
            return_dict (`bool`, *optional*, defaults to True): return a
                ``Transformer2DModelOutput`` instead of a tuple.

        Returns:
            ``Transformer2DModelOutput(sample=(B, C_out, H, W))`` or ``(sample,)``.

        Raises:
            ValueError: missing timestep or labels, a batch whose timesteps span two stages,
                ``hidden_states`` with the wrong channel count, a height or width that is not a
                multiple of ``patch_size`` (other sizes than ``sample_size`` run, as in diffusers,
                with recomputed positions), on another device than the weights, or class labels
                out of range. Labels are range-checked when they are on the CPU (a list, an int
                or a CPU tensor): checking device labels would cost a sync per forward.
            TypeError: ``hidden_states`` of another dtype than the weights (no silent cast: the
                diffusers model raises on this too; cast with ``hidden_states.to(model.dtype)``),
                or float labels.
        """
        if cross_attention_kwargs:
            raise NotImplementedError(
                f"MosaicDiT does not support cross_attention_kwargs, got keys {sorted(cross_attention_kwargs)}"
            )
        self._check_hidden_states(hidden_states)
        batch, device = hidden_states.shape[0], hidden_states.device
        # 1. Stage (one host read) and inputs.
        stage, t_vec = self._select(timestep, batch, device)
        labels = self._labels(class_labels, batch, device)
        self._notify_stage(stage, hidden_states)
        # 2. Stage forward: CUDA graph replay where enabled and possible, else eager.
        if self._graphs is not None:
            output = self._graphs(stage, hidden_states, t_vec, labels)
        else:
            output = self.forward_stage(stage, hidden_states, t_vec, labels)
        if not return_dict:
            return (output,)
        return _transformer_output_cls()(sample=output)

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

    # ------------------------------------------------------------------ stage-change hook

    def _notify_stage(self, stage: int, hidden_states: torch.Tensor) -> None:
        """Call the kernel-config selection and the user hook when the stage (or shape) changes."""
        p = int(self.config.patch_size)
        batch = int(hidden_states.shape[0])
        tokens = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)
        key = (stage, batch, tokens, hidden_states.dtype, hidden_states.device)
        if key == self._last_stage_key:
            return
        self._last_stage_key = key
        try:
            from mosaic_kernels import configs as kernel_configs
        except ImportError:  # pragma: no cover - mosaic_kernels is a hard dependency
            kernel_configs = None
        if kernel_configs is not None and hasattr(kernel_configs, "select_configs_for_shapes"):
            items = self.stage_kernel_shapes(stage, batch, tokens, hidden_states.dtype)
            try:
                kernel_configs.select_configs_for_shapes(items, hidden_states.device)
            except Exception as exc:  # config selection must never break sampling
                logger.warning("kernel config selection failed for stage %d: %s", stage, exc)
        if self.on_stage_change is not None:
            self.on_stage_change(stage, self._stage_meta[stage][0])

    def stage_kernel_shapes(
        self, stage: int, batch: int, tokens: int, dtype: torch.dtype
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The distinct kernel-op shapes a stage runs, for ``mosaic_kernels.configs``.

        Args:
            stage (`int`): stage index.
            batch (`int`): B.
            tokens (`int`): tokens per image L.
            dtype (`torch.dtype`): activation dtype.

        Returns:
            sorted list of ``(op, shape, dtype)``: row ops with ``(B, L, C)``, GEMM ops with
            ``(M, N, K)``, ``M = B*L``, attention with ``(B, L, heads, head_dim)``.
        """
        C, M = self._runtime["width"], batch * tokens
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

    def autotune_kernels(
        self, batch: int, tokens: int, dtype: torch.dtype | None = None, ops: Sequence[str] = ("attention",)
    ) -> dict[str, dict[str, Any]]:
        """Measure and persist the kernel configs of every stage for one input shape (CUDA only).

        Each stage has its own head count and widths, so each gets its own winner (e.g. which
        SDPA kernel runs head_dim 72 fastest at 6 vs 16 heads). The winners go to the
        `mosaic_kernels.configs` cache, which every later forward (and process) reads.

        Args:
            batch (`int`): forward batch (with CFG, twice the images per step).
            tokens (`int`): tokens per image.
            dtype (`torch.dtype`, *optional*): activation dtype; default the weights'.
            ops (sequence of `str`, *optional*): which ops to tune; default attention only (a
                GEMM search compiles dozens of Triton kernels).

        Returns:
            ``{config_key: config}`` of the tuned ops over all stages (resolved, not tuned, off CUDA).
        """
        from mosaic_kernels import configs as kernel_configs

        dtype = dtype or self.dtype
        chosen: dict[str, dict[str, Any]] = {}
        for stage in range(self.num_stages):
            items = [it for it in self.stage_kernel_shapes(stage, batch, tokens, dtype) if it[0] in ops]
            chosen.update(kernel_configs.select_configs_for_shapes(items, self.device, tune=True))
        return chosen

    # ------------------------------------------------------------------ CUDA graphs

    def enable_cuda_graphs(self, enabled: bool = True) -> MosaicDiT:
        """Capture each stage's forward as a CUDA graph per input signature and replay it.

        Inputs that cannot be captured (CPU tensors, a failed capture) run eagerly, logged once.
        Graphs are dropped when the module is moved or cast.

        Args:
            enabled (`bool`, *optional*, defaults to True): turn graphs on or off.

        Returns:
            `MosaicDiT`: self.
        """
        from mosaicdiff.graphs import StageGraphRunner

        self._graphs = StageGraphRunner(self.forward_stage) if enabled else None
        return self

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self._graphs is not None

    def set_block_boundary_fusion(self, enabled: bool = True) -> MosaicDiT:
        """Fuse fc2's gated residual with the next norm (default on); off runs each block alone.

        Off is the reference for measuring the fusion; captured graphs are dropped.

        Args:
            enabled (`bool`, *optional*, defaults to True): fuse or not.

        Returns:
            `MosaicDiT`: self.
        """
        self.fuse_block_boundaries = bool(enabled)
        if self._graphs is not None:
            self._graphs.reset()
        return self

    def _apply(self, fn, *args, **kwargs):
        # Captured graphs hold raw pointers to the weights: drop them when weights move.
        if getattr(self, "_graphs", None) is not None:
            self._graphs.reset()
        self._last_stage_key = None
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ memory and repr

    def memory_report(self) -> dict[str, Any]:
        """Parameter counts and bytes of the mosaic against the dense model it came from.

        Tensors sharing storage are counted once. Non-persistent buffers (the sin-cos positions)
        are excluded on both sides.

        Returns:
            `dict` with ``shared_params``, ``shared_bytes``, ``stages`` (name -> params, bytes,
            sparsity), ``mosaic_params``, ``mosaic_bytes``, ``dense_params``, ``dense_bytes``
            (dtype at construction), ``dense_bytes_same_dtype`` (dense params at the mosaic's
            element size) and ``ratio`` (``mosaic_bytes / dense_bytes_same_dtype``).
        """
        seen: set[tuple[int, int]] = set()

        def count(module: nn.Module) -> tuple[int, int]:
            n = b = 0
            for p in module.parameters():
                if p.device.type == "meta":
                    key = (id(p), 0)
                else:
                    key = (p.untyped_storage().data_ptr(), p.storage_offset())
                if key in seen:
                    continue
                seen.add(key)
                n += p.numel()
                b += p.numel() * p.element_size()
            return n, b

        shared_n, shared_b = count(self.shared)
        stages = {}
        total_n, total_b = shared_n, shared_b
        for (name, _, _, sp), blocks in zip(self._stage_meta, self.stage_blocks):
            n, b = count(blocks)
            stages[name] = {"params": n, "bytes": b, "sparsity": sp}
            total_n += n
            total_b += b
        elem = self.shared.conditioning.mod_weight.element_size()
        dense_same = self._dense_ref["params"] * elem
        return {
            "shared_params": shared_n,
            "shared_bytes": shared_b,
            "stages": stages,
            "mosaic_params": total_n,
            "mosaic_bytes": total_b,
            "dense_params": self._dense_ref["params"],
            "dense_bytes": self._dense_ref["bytes"],
            "dense_dtype": self._dense_ref["dtype"],
            "dense_bytes_same_dtype": dense_same,
            "ratio": total_b / dense_same if dense_same else math.nan,
        }

    def extra_repr(self) -> str:
        stages = ", ".join(f"{n}[{a},{b}) sparsity={s:g}" for n, a, b, s in self._stage_meta)
        return (
            f"num_layers={self._runtime['num_layers']}, width={self._runtime['width']}, "
            f"stages=[{stages}], cuda_graphs={self.cuda_graphs_enabled}"
        )

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, save_directory: str) -> None:
        """Save as ``config.json`` + ``model.safetensors``, crash-safely (see `mosaicdiff.serialization`).

        Args:
            save_directory (`str` or `os.PathLike`): target folder, created if missing. The two
                files are written next to whatever else is in it; only they are replaced.

        Raises:
            FileExistsError / PermissionError: the folder is a file, holds another kind of model,
                or is not writable (see `mosaicdiff.serialization.validate_save_directory`).
            BlockingIOError: another save into the same folder is in progress.
            OSError: writing failed (e.g. disk full); the folder is left as it was.
        """
        from mosaicdiff.serialization import save_mosaic

        save_mosaic(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        *,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> MosaicDiT:
        """Load a directory written by `save_pretrained`, validating versions, keys and shapes.

        Args:
            directory (`str` or `os.PathLike`): the saved mosaic.
            device (`torch.device` or `str`, *optional*): where to put the weights.
            torch_dtype (`torch.dtype` or `str`, *optional*): cast the weights to this dtype
                (``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"``, ``"float32"``/``"fp32"``).

        Returns:
            `MosaicDiT`.

        Raises:
            FileNotFoundError: missing directory, config or weights.
            ValueError: corrupt/truncated files, an invalid config (file and field named), a
                format version mismatch, weights that do not match the config (the message names
                the key), or a `device` that is not a device.
            TypeError: a `torch_dtype` that is not a float dtype or one of the names above.
            RuntimeError: `device` is CUDA/MPS and none is available.

        Examples:
            >>> from mosaicdiff.mosaic import MosaicDiT
            >>> mosaic = MosaicDiT.from_pretrained("out/mosaic-dit")  # doctest: +SKIP
        """
        from mosaicdiff.serialization import load_mosaic

        return load_mosaic(directory, device=device, torch_dtype=torch_dtype)

    @classmethod
    def _from_parts(
        cls,
        config,
        skeleton: SharedSkeleton,
        stages: Sequence[StageSpec],
        runtime: dict[str, Any],
        dense_ref: dict[str, Any],
        meta: dict[str, Any] | None,
    ) -> MosaicDiT:
        """Build without a dense model (used by the loader)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(_frozen_config(dict(config)), skeleton, stages, runtime, dense_ref, None, meta)
        return obj


def build_skeleton(dense_config: dict, runtime: dict[str, Any]) -> SharedSkeleton:
    """Rebuild an (uninitialised) shared skeleton from a dense ``DiTTransformer2DModel`` config.

    The diffusers model is instantiated with a single block (under a forked RNG, so the caller's
    random state is untouched) to obtain exactly diffusers' patch embedding and embedder modules.

    Args:
        dense_config (`dict`): the dense model's config.
        runtime (`dict`): ``num_layers``, ``width`` and ``shared_embedder`` of the mosaic.

    Returns:
        `SharedSkeleton` in float32 on CPU, with an uninitialised adaLN matrix.
    """
    from diffusers import DiTTransformer2DModel

    cfg = {k: v for k, v in dense_config.items() if not k.startswith("_")}
    cfg["num_layers"] = 1
    with torch.random.fork_rng(devices=[]):
        dit = DiTTransformer2DModel.from_config(cfg)
    L, C = int(runtime["num_layers"]), int(runtime["width"])
    emb = dit.transformer_blocks[0].norm1.emb
    embedders = [emb] if runtime["shared_embedder"] else [copy.deepcopy(emb) for _ in range(L)]
    conditioning = SharedConditioning(
        embedders, torch.empty(L * 6 * C, C), torch.empty(L * 6 * C), num_layers=L
    )
    return SharedSkeleton(dit.pos_embed, conditioning, dit.proj_out_1, dit.proj_out_2, dit.norm_out.eps)


def _check_block_math(dense: nn.Module) -> None:
    """Reject DiT variants whose block math `CompactDiTBlock` does not reproduce.

    Raises:
        NotImplementedError: naming the block and the unsupported feature.
    """
    head_dim = int(dense.config.attention_head_dim)
    for i, block in enumerate(dense.transformer_blocks):
        attn = block.attn1
        problems = []
        if getattr(block.norm3, "weight", None) is not None or getattr(block.norm3, "bias", None) is not None:
            problems.append("affine norm3 (norm_elementwise_affine=True)")
        if getattr(block, "pos_embed", None) is not None:
            problems.append("per-block positional embeddings")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            problems.append("qk-norm")
        if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
            problems.append("attention residual/rescale")
        if not math.isclose(float(getattr(attn, "scale", head_dim ** -0.5)), head_dim ** -0.5, rel_tol=1e-6):
            problems.append(f"attention scale {attn.scale} != head_dim**-0.5")
        if problems:
            raise NotImplementedError(
                f"MosaicDiT: transformer_blocks[{i}] uses {', '.join(problems)}, which the compact "
                f"block does not implement"
            )


def _to_like(w: CompactBlockWeights, ref: torch.Tensor) -> CompactBlockWeights:
    """Convert the float tensors of ``w`` to ``ref``'s device and dtype (no copy when equal)."""
    kw = {
        k: (v if k.startswith("kept_") else v.detach().to(device=ref.device, dtype=ref.dtype))
        for k, v in w.tensors().items()
    }
    return CompactBlockWeights(**kw)


def _check_stages(stages: list[StageSpec], runtime: dict[str, Any]) -> None:
    """Validate stage ranges and the block counts and index ranges against the dense model.

    Raises:
        ValueError: quoting the offending stage and values.
    """
    if not stages:
        raise ValueError("MosaicDiT needs at least one stage, got none")
    for s in stages:
        if not isinstance(s, StageSpec):
            raise TypeError(f"stages must be StageSpec, got {type(s).__name__}")
        if not s.t_start < s.t_end:
            raise ValueError(f"stage {s.name!r}: t_start must be < t_end, got [{s.t_start}, {s.t_end})")
        if len(s.blocks) != runtime["num_layers"]:
            raise ValueError(
                f"stage {s.name!r}: expected {runtime['num_layers']} blocks, got {len(s.blocks)}"
            )
        for j, w in enumerate(s.blocks):
            for name, limit in (("kept_heads", runtime["num_heads"]), ("kept_channels", runtime["mlp_hidden"])):
                idx = getattr(w, name)
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
                    raise ValueError(
                        f"stage {s.name!r} block {j}: {name} must lie in [0, {limit}), got "
                        f"[{int(idx.min())}, {int(idx.max())}]"
                    )
                if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    raise ValueError(f"stage {s.name!r} block {j}: {name} must be sorted and unique")
            if int(w.proj_bias.shape[0]) != runtime["width"]:
                raise ValueError(
                    f"stage {s.name!r} block {j}: width must be {runtime['width']}, "
                    f"got {int(w.proj_bias.shape[0])}"
                )
    ordered = sorted(stages, key=lambda s: s.t_start)  # the caller's order is kept for indexing
    for a, b in zip(ordered, ordered[1:]):
        if a.t_end != b.t_start:
            kind = "overlap" if a.t_end > b.t_start else "leave a gap"
            raise ValueError(
                f"stages {a.name!r} [{a.t_start}, {a.t_end}) and {b.name!r} [{b.t_start}, {b.t_end}) "
                f"{kind}; stage ranges must be contiguous"
            )

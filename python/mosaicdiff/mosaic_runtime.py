"""How a mosaic's stages run: kernel configs chosen per stage shape, CUDA graphs, the fusion of
block boundaries, and what the mosaic costs in memory against its dense model.

`StageRuntimeMixin` is mixed into the mosaic classes (`mosaicdiff.mosaic.MosaicDiT`); it reads
their ``stage_blocks`` (one ``ModuleList`` of compact blocks per stage), ``config.patch_size``,
``stage_names`` and the block width in ``runtime_info``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["StageRuntimeMixin", "memory_report"]


class StageRuntimeMixin:
    """Per-stage kernel configs, CUDA graphs and block-boundary fusion of a stage-switching model."""

    def _init_stage_runtime(self) -> None:
        """Eager, fused, no graphs, no stage seen yet (call at the end of the model's ``__init__``)."""
        self._graphs = None
        self._last_stage_key = None
        self.fuse_block_boundaries = True
        self.on_stage_change = None  # (stage index, stage name) -> None, called when the stage changes


    def _notify_stage(self, stage: int, hidden_states: torch.Tensor) -> None:
        """Call the kernel-config selection and the user hook when the stage (or shape) changes."""
        p = int(self.config.patch_size)
        batch = int(hidden_states.shape[0])
        tokens = (hidden_states.shape[-2] // p) * (hidden_states.shape[-1] // p)
        key = (stage, batch, tokens, hidden_states.dtype, hidden_states.device)
        if key == self._last_stage_key:
            return
        self._last_stage_key = key
        from mosaic_kernels import configs as kernel_configs

        items = self.stage_kernel_shapes(stage, batch, tokens, hidden_states.dtype)
        try:
            kernel_configs.select_configs_for_shapes(items, hidden_states.device)
        except Exception as exc:  # config selection must never break sampling
            logger.warning("kernel config selection failed for stage %d: %s", stage, exc)
        if self.on_stage_change is not None:
            self.on_stage_change(stage, self.stage_names[stage])

    def stage_kernel_shapes(
        self, stage: int, batch: int, tokens: int, dtype: torch.dtype
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The distinct kernel-op shapes a stage runs, for ``mosaic_kernels.configs``.

        Returns:
            sorted list of ``(op, shape, dtype)``: row ops with ``(B, L, C)``, GEMM ops with
            ``(M, N, K)``, ``M = B*L``, attention with ``(B, L, heads, head_dim)``.
        """
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

    def autotune_kernels(
        self, batch: int, tokens: int, dtype: torch.dtype | None = None, ops: Sequence[str] = ("attention",)
    ) -> dict[str, dict[str, Any]]:
        """Measure and persist the kernel configs of every stage for one input shape (CUDA only).

        Each stage has its own head count and widths, so each gets its own winner. The winners go
        to the `mosaic_kernels.configs` cache, which every later forward (and process) reads.

        Args:
            batch (`int`): forward batch (with CFG, twice the images per step).
            tokens (`int`): tokens per image.
            dtype (`torch.dtype`, *optional*): activation dtype; default the weights'.
            ops (sequence of `str`, *optional*): which ops to tune; default attention only.

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

    def enable_cuda_graphs(self, enabled: bool = True):
        """Capture each stage's forward as a CUDA graph per input signature and replay it.

        Inputs that cannot be captured (CPU tensors, a failed capture) run eagerly, logged once.
        Graphs are dropped when the module is moved or cast. Returns self.
        """
        from mosaicdiff.graphs import StageGraphRunner

        self._graphs = StageGraphRunner(self.forward_stage) if enabled else None
        return self

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self._graphs is not None

    def set_block_boundary_fusion(self, enabled: bool = True):
        """Fuse fc2's gated residual with the next norm (default on); off runs each block alone.

        Off is the reference for measuring the fusion; captured graphs are dropped. Returns self.
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


def memory_report(model) -> dict[str, Any]:
        """Parameter counts and bytes of the mosaic against the dense model it came from.

        Tensors sharing storage are counted once (a shared-producer mosaic's stages hold views of
        one storage per block: `mosaicdiff.shared_producers`). Non-persistent buffers (the
        sin-cos positions) are excluded on both sides.

        Returns:
            `dict` with ``shared_params``, ``shared_bytes`` (the skeleton), ``producer_params``,
            ``producer_bytes`` (the shared producer storage, 0 without one), ``stages`` (name ->
            params, bytes, sparsity: what the stage stores on its own), ``mosaic_params``,
            ``mosaic_bytes``, ``dense_params``, ``dense_bytes`` (dtype at construction),
            ``dense_bytes_same_dtype`` (dense params at the mosaic's element size), ``ratio``
            (``mosaic_bytes / dense_bytes_same_dtype``: against the dense model as loaded),
            ``dense_params_dedup`` (the dense model with one timestep/class embedder instead of
            one per block, as diffusers' DiT stores them) and ``ratio_dedup`` (against that).
        """
        seen: set[tuple[int, int]] = set()

        def count(module: nn.Module | None) -> tuple[int, int]:
            n = b = 0
            for p in module.parameters() if module is not None else ():
                key = (id(p), 0) if p.device.type == "meta" else (p.untyped_storage().data_ptr(), p.storage_offset())
                if key not in seen:
                    seen.add(key)
                    n, b = n + p.numel(), b + p.numel() * p.element_size()
            return n, b

        shared_n, shared_b = count(model.shared)
        prod_n, prod_b = count(model.producer_storage)
        stages, total_n, total_b = {}, shared_n + prod_n, shared_b + prod_b
        for (name, _, _, sp), blocks in zip(model.stage_ranges, model.stage_blocks):
            n, b = count(blocks)
            stages[name] = {"params": n, "bytes": b, "sparsity": sp}
            total_n, total_b = total_n + n, total_b + b
        dense = model.config.dense_reference or {"params": 0, "bytes": 0, "dtype": None}
        element = model.shared.conditioning.mod_weight.element_size()
        dense_same = dense["params"] * element
        embedder = dense.get("embedder_params")
        if embedder is None:  # saved before the field existed: the skeleton's own embedder
            embedder = sum(p.numel() for p in model.shared.conditioning.embedders[0].parameters())
        copies = model.runtime_info["num_layers"] - 1 if model.shared.conditioning.shared_embedder else 0
        dedup = dense["params"] - copies * embedder if dense["params"] else 0
        return {
            "shared_params": shared_n, "shared_bytes": shared_b, "producer_params": prod_n, "producer_bytes": prod_b,
            "stages": stages, "mosaic_params": total_n, "mosaic_bytes": total_b,
            "dense_params": dense["params"], "dense_bytes": dense["bytes"], "dense_dtype": dense["dtype"],
            "dense_bytes_same_dtype": dense_same, "ratio": total_b / dense_same if dense_same else math.nan,
            "dense_params_dedup": dedup, "ratio_dedup": total_b / (dedup * element) if dedup else math.nan,
        }

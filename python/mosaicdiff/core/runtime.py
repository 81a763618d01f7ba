"""How a mosaic's stages run: kernel configs chosen per stage shape, CUDA graphs, the fusion of
block boundaries, and what the mosaic costs in memory against its dense model.

`StageRuntimeMixin` is part of every mosaic (`mosaicdiff.core.model.MosaicModel`); it reads its
``stage_blocks`` (one ``ModuleList`` of compact blocks per stage), ``stage_names`` and
``forward_stage`` (the graph-capturable stage forward), and asks the family for the kernel shapes
of a stage (``stage_kernel_shapes``).

Kernel configs belong to shapes, not stages: stages whose kernel shapes are identical (equal
widths; `stage_shape_groups`) share their configs, so a K-stage mosaic tunes each distinct shape
once (`autotune_kernels`) and entering a stage with the previous stage's shapes selects nothing.
CUDA graphs stay per stage (`mosaicdiff.core.graphs`: a graph holds its stage's weight pointers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["GEMM_OPS", "StageRuntimeMixin"]

#: The GEMM ops of ``stage_kernel_shapes``. A quantized stage (`mosaicdiff.quantize`) runs its GEMMs
#: as ``fp8_gemm``, which has no per-shape config: their bf16 configs are not selected or tuned.
GEMM_OPS = frozenset({"linear_gelu", "linear_gated_residual", "linear_geglu", "linear_residual"})


class StageRuntimeMixin:
    """Per-stage kernel configs, CUDA graphs and block-boundary fusion of a stage-switching model."""

    def _init_stage_runtime(self) -> None:
        """Eager, fused, no graphs, no stage seen yet (call at the end of the model's ``__init__``)."""
        self._graphs = None
        self._last_stage_key = None
        self._last_stage_shapes = None  # (kernel shapes, device) of the last selection
        self.fuse_block_boundaries = True
        self.on_stage_change = None  # (stage index, stage name) -> None, called when the stage changes


    def _notify_stage(self, stage: int, batch: int, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        """Select the stage's kernel configs and call the user hook when the stage (or shape) changes.

        The selection is skipped when the new stage runs the same kernel shapes as the previous
        one (a stage of the same shape group: its configs are already resolved).
        """
        key = (stage, batch, tokens, dtype, device)
        if key == self._last_stage_key:
            return
        self._last_stage_key = key
        from mosaic_kernels import configs as kernel_configs

        items = self._selectable_kernel_shapes(stage, batch, tokens, dtype)
        shapes = (frozenset(items), device)
        if shapes != self._last_stage_shapes:
            self._last_stage_shapes = shapes
            try:
                kernel_configs.select_configs_for_shapes(items, device)
            except Exception as exc:  # config selection must never break sampling
                logger.warning("kernel config selection failed for stage %d: %s", stage, exc)
        if self.on_stage_change is not None:
            self.on_stage_change(stage, self.stage_names[stage])

    def stage_kernel_shapes(
        self, stage: int, batch: int, tokens: int, dtype: torch.dtype
    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The distinct kernel-op shapes a stage runs, for ``mosaic_kernels.configs`` (family hook).

        Returns:
            sorted list of ``(op, shape, dtype)``: row ops with ``(B, L, C)``, GEMM ops with
            ``(M, N, K)``, ``M = B*L``, attention with ``(B, L, heads, head_dim)``.
        """
        return []

    def _selectable_kernel_shapes(self, stage: int, batch: int, tokens: int,
                                  dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """`stage_kernel_shapes` less the `GEMM_OPS` when the stage's weights are float8."""
        items = self.stage_kernel_shapes(stage, batch, tokens, dtype)
        if any(p.dtype == torch.float8_e4m3fn for p in self.stage_blocks[stage].parameters()):
            items = [it for it in items if it[0] not in GEMM_OPS]
        return items

    def stage_shape_groups(self, batch: int, tokens: int, dtype: torch.dtype | None = None) -> list[list[int]]:
        """The stages grouped by identical kernel shapes (equal widths): the stages of a group
        share their kernel configs (tuned once, selected once in a row).

        Args:
            batch (`int`): forward batch (with CFG, twice the images per step).
            tokens (`int`): tokens per image.
            dtype (`torch.dtype`, *optional*): activation dtype; default the weights'.

        Returns:
            `list[list[int]]`: stage indices per group, ascending, groups in order of their first stage.
        """
        dtype = dtype or self.dtype
        groups: dict[frozenset, list[int]] = {}
        for stage in range(self.num_stages):
            groups.setdefault(frozenset(self.stage_kernel_shapes(stage, batch, tokens, dtype)), []).append(stage)
        return list(groups.values())

    def autotune_kernels(
        self, batch: int, tokens: int, dtype: torch.dtype | None = None, ops: Sequence[str] = ("attention",)
    ) -> dict[str, dict[str, Any]]:
        """Measure and persist the kernel configs of every stage for one input shape (CUDA only).

        Each stage has its own head count and widths, so each shape gets its own winner; the
        distinct ``(op, shape, dtype)`` of all stages are collected first and each is tuned once
        (stages sharing widths share configs). The winners go to the `mosaic_kernels.configs`
        cache, which every later forward (and process) reads.

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
        items = {it: None for stage in range(self.num_stages)  # distinct, in first-seen order
                 for it in self._selectable_kernel_shapes(stage, batch, tokens, dtype) if it[0] in ops}
        return kernel_configs.select_configs_for_shapes(list(items), self.device, tune=True)

    def enable_cuda_graphs(self, enabled: bool = True):
        """Capture each stage's forward as a CUDA graph per input signature and replay it.

        Inputs that cannot be captured (CPU tensors, a failed capture) run eagerly, logged once.
        Graphs are dropped when the module is moved or cast. Stages sharing widths still get a
        graph each (a graph holds its stage's weight pointers); what each stage's graphs cost in
        device memory is `memory_report`'s ``graph_bytes``. Returns self.
        """
        from mosaicdiff.core.graphs import StageGraphRunner

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
        self._last_stage_key = self._last_stage_shapes = None
        return super()._apply(fn, *args, **kwargs)

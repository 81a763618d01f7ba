"""CUDA graphs for the stage forwards of a mosaic (`mosaicdiff.core.model.MosaicModel`).

`StageGraphRunner` wraps a function ``fn(stage, *tensors) -> out`` with no host
synchronisation inside (a family's ``forward_stage``). On the first call with a new
signature -- (stage, input shapes, dtypes, device) -- it warms ``fn`` up on a side stream (Triton
compiles and autotunes there, outside the capture), captures one call into a CUDA graph with
static input buffers, and from then on copies the inputs into those buffers and replays. All
graphs share one memory pool: they are replayed one at a time, and the output is returned as a
clone, so a later replay never overwrites what a caller (e.g. a multistep scheduler) kept.

Where capture is impossible (CPU tensors, no CUDA, a capture error) the call runs eagerly; the
reason is logged once.

Graphs are per stage even where two stages have the same widths (and so share their kernel
configs, `mosaicdiff.core.runtime.StageRuntimeMixin.stage_shape_groups`): a captured graph holds the
raw pointers of the weights it read, and every stage has its own weights. Only stages built on the
very same block modules could replay one graph; no mosaic builds those, so no graph is shared.

Each capture's memory cost is recorded (`graph_bytes`, `bytes_per_stage`; `memory_report`'s
``graph_bytes``): the growth of the device's reserved memory over the recording alone (the
warm-up's allocations are the caching allocator's, not the graph's), after the cached free blocks
were released as ``torch.cuda.graph`` itself releases them. With one pool for all graphs, a later
capture reuses what an earlier one freed, so each figure is what that capture added (in the
allocator's segment sizes: a small graph may add nothing) and their sum is what the pool reserved.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["StageGraphRunner"]

StageFn = Callable[..., torch.Tensor]


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    nbytes: int = 0  # device memory the capture added (see the module docstring)


class StageGraphRunner:
    r"""Capture and replay one CUDA graph per (stage, input signature).

    Parameters:
        fn (`Callable[..., Tensor]`): the stage forward ``fn(stage, *tensors)``; must not read
            device values on the host nor allocate outside the caching allocator.
        warmup_iters (`int`, *optional*, defaults to 2): eager calls on a side stream before capture.
        clone_output (`bool`, *optional*, defaults to True): return a clone of the static output
            (safe); False returns the static buffer itself, overwritten by the next replay of
            that graph.

    Raises:
        ValueError: if ``warmup_iters`` < 1.
    """

    def __init__(self, fn: StageFn, *, warmup_iters: int = 2, clone_output: bool = True):
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1, got {warmup_iters}")
        self._fn = fn
        self.warmup_iters = int(warmup_iters)
        self.clone_output = bool(clone_output)
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: dict[tuple, str] = {}
        self._logged: set[str] = set()
        self._pool = None

    # ------------------------------------------------------------------ bookkeeping

    @property
    def num_graphs(self) -> int:
        """Number of captured graphs."""
        return len(self._graphs)

    @property
    def graph_bytes(self) -> dict[tuple, int]:
        """Device bytes each captured graph added, by signature ``(stage, inputs...)``."""
        return {key: captured.nbytes for key, captured in self._graphs.items()}

    def bytes_per_stage(self) -> dict[int, int]:
        """Device bytes the captured graphs added, summed per stage index (stages without a graph absent)."""
        out: dict[int, int] = {}
        for key, captured in self._graphs.items():
            out[key[0]] = out.get(key[0], 0) + captured.nbytes
        return out

    @property
    def failed(self) -> dict[tuple, str]:
        """Signatures whose capture failed, with the reason (they run eagerly)."""
        return dict(self._failed)

    def reset(self) -> None:
        """Drop every graph (e.g. after the weights moved); the next calls capture again."""
        self._graphs.clear()
        self._failed.clear()
        self._pool = None

    def _log_once(self, level: int, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.log(level, "CUDA graphs not used, running eagerly: %s", reason)

    @staticmethod
    def _blocker(inputs: tuple[torch.Tensor, ...]) -> str | None:
        """Why these inputs cannot be captured, or None."""
        devices = {t.device for t in inputs}
        if len(devices) != 1:
            return f"inputs on several devices {sorted(str(d) for d in devices)}"
        device = next(iter(devices))
        if device.type != "cuda":
            return f"inputs are on {device.type}, not CUDA"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.is_current_stream_capturing():
            return "already inside a CUDA graph capture"
        return None

    @staticmethod
    def _signature(stage: int, inputs: tuple[torch.Tensor, ...]) -> tuple:
        return (int(stage),) + tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)

    # ------------------------------------------------------------------ capture and replay

    def _eager(self, stage: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return self._fn(stage, *inputs)

    def _capture(self, stage: int, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        """Warm up, then record one call with static copies of ``inputs``, measuring what the recording reserves."""
        device = inputs[0].device
        with torch.inference_mode(False):  # normal tensors: copy_ into them works in and out of inference mode
            static = tuple(t.detach().clone().contiguous() for t in inputs)
        self._warm_up(stage, static)
        before = self._pool_bytes(device)
        graph, output = self._record(stage, static)
        return _Captured(graph, static, output, max(0, self._pool_bytes(device) - before))

    def _warm_up(self, stage: int, static: tuple[torch.Tensor, ...]) -> None:
        """``warmup_iters`` eager calls on a side stream (Triton compiles and autotunes here)."""
        with torch.cuda.device(static[0].device), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self._fn(stage, *static)
            torch.cuda.current_stream().wait_stream(side)

    def _record(self, stage: int, static: tuple[torch.Tensor, ...]) -> tuple[object, torch.Tensor]:
        """One call captured into a new graph in the shared pool: ``(graph, static output)``."""
        with torch.cuda.device(static[0].device), torch.no_grad():
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._fn(stage, *static)
        return graph, output

    @staticmethod
    def _pool_bytes(device: torch.device) -> int:
        """The device's reserved bytes with garbage and cached free blocks released first (as
        ``torch.cuda.graph`` releases them on entry: they must not hide the capture's growth)."""
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        return int(torch.cuda.memory_reserved(device))

    def __call__(self, stage: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Run ``fn(stage, *inputs)``, through a graph when possible.

        Args:
            stage (`int`): stage index.
            inputs (`torch.Tensor`): the stage forward's tensor arguments (a DiT's hidden states,
                (B,) timesteps and class ids; a U-Net's sample, timesteps and text states, ...).

        Returns:
            `torch.Tensor`: ``fn``'s output (a fresh tensor unless ``clone_output=False``).
        """
        reason = self._blocker(inputs)
        if reason is not None:
            self._log_once(logging.INFO, reason)
            return self._eager(stage, inputs)
        key = self._signature(stage, inputs)
        if key in self._failed:
            return self._eager(stage, inputs)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(stage, inputs)
            except Exception as exc:  # capture is an optimisation: fall back, never crash
                self._failed[key] = f"{type(exc).__name__}: {exc}"
                self._log_once(logging.WARNING, f"capture failed for stage {stage}: {self._failed[key]}")
                return self._eager(stage, inputs)
            self._graphs[key] = captured
            logger.debug("captured CUDA graph for stage %d, signature %s: %d bytes", stage, key[1:], captured.nbytes)
        for dst, src in zip(captured.inputs, inputs):
            dst.copy_(src)
        captured.graph.replay()
        return captured.output.clone() if self.clone_output else captured.output

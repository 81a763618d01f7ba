"""diffusers' caching hooks (first-block cache, TaylorSeer) on a stage-switching mosaic.

diffusers' caches hook a dense model's list of transformer blocks (``transformer_blocks``,
``single_transformer_blocks``) and carry state from one sampler step to the next: the first
block's residual and the remaining blocks' (`~diffusers.hooks.FirstBlockCacheConfig`), or the
Taylor factors of a module's output (`~diffusers.hooks.TaylorSeerCacheConfig`). A mosaic holds one
list of compact blocks per stage and changes list as the timestep moves, so `MosaicCacheMixin`:

- applies diffusers' own ``apply_first_block_cache`` / ``apply_taylorseer_cache`` to each stage's
  blocks as if they were a model of their own (`_StageView`): each stage has its own state;
- puts a stage-switch hook on each stage's first block: when a cache context's forward runs
  another stage (or another input shape) than its previous forward, that context's state is
  dropped in every stage. What a stage cached was computed by blocks that no longer run (or for
  another batch), and a stage entered again later must not reuse it;
- runs the blocks unfused while a cache is on: the hooks wrap a block's ``forward``, which the
  fused block boundaries (``forward_normed``) bypass.

`count_block_evaluations` counts the block forwards that really ran (a cache's skipped or
predicted blocks are not counted), for measuring what a cache saves.

Examples:
    >>> from diffusers.hooks import FirstBlockCacheConfig
    >>> mosaic.enable_cache(FirstBlockCacheConfig(threshold=0.05))  # doctest: +SKIP
    >>> with mosaic.cache_context("cond"):  # doctest: +SKIP
    ...     images = mosaicdiff.sample(mosaic, labels, num_inference_steps=50)
    >>> mosaic.reset_cache()  # before the next run (diffusers' pipelines do it)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from diffusers.hooks import (FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                             apply_taylorseer_cache)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK
from diffusers.models.cache_utils import CacheMixin
from torch import nn

__all__ = ["BlockEvaluations", "MosaicCacheMixin", "PairedJointBlock", "count_block_evaluations"]

#: The cache configs a mosaic takes.
SUPPORTED_CONFIGS = (FirstBlockCacheConfig, TaylorSeerCacheConfig)
_STAGE_HOOK = "mosaic_stage_switch"
_COUNT_HOOK = "mosaic_block_count"
_CACHE_HOOKS = (_STAGE_HOOK, _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK, _TAYLORSEER_CACHE_HOOK)


class _StageView(nn.Module):
    """One stage's blocks under the names diffusers' hooks look for (a view: the mosaic owns them)."""

    def __init__(self, lists: dict[str, nn.ModuleList]):
        super().__init__()
        for name, blocks in lists.items():
            setattr(self, name, blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``(name, block)`` in call order, flattened as ``apply_first_block_cache`` does."""
        return [(f"{name}.{i}", b) for name, lst in self.named_children() for i, b in enumerate(lst)]


class PairedJointBlock(nn.Module):
    r"""A joint-stream block (``[text | image]`` in, the same out) called as a two-stream one.

    diffusers' first-block cache keeps one residual per stream, from the head block's
    ``(image, text)`` to the last block's; a mosaic whose single-stream blocks run on the
    concatenated stream (Flux) runs them through this adapter while the cache is on.

    Args:
        block (`nn.Module`): ``block(h, *args) -> h`` on the joint stream, text tokens first.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states.shape[1]
        h = self.block(torch.cat([encoder_hidden_states, hidden_states], dim=1), *args)
        return h[:, text:].contiguous(), h[:, :text].contiguous()


def _register_metadata(cls: type, two_stream: bool) -> None:
    """How diffusers' first-block cache reads a compact block's call: the (image) stream is the
    first argument and output, the text stream the second of a two-stream block."""
    try:
        TransformerBlockRegistry.get(cls)
        return
    except ValueError:
        pass
    indices = {"hidden_states": 0, "encoder_hidden_states": 1} if two_stream else {"hidden_states": 0}
    TransformerBlockRegistry.register(cls, TransformerBlockMetadata(
        return_hidden_states_index=0, return_encoder_hidden_states_index=1 if two_stream else None,
        _cls=cls, _cached_parameter_indices=indices))


def _managers(view: nn.Module) -> list[StateManager]:
    """The state managers of the cache hooks under `view`, each once."""
    found: dict[int, StateManager] = {}
    for module in view.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            manager = getattr(hook, "state_manager", None)
            if isinstance(manager, StateManager):
                found[id(manager)] = manager
    return list(found.values())


class _StageCaches:
    """Every stage's state managers, and the (stage, input shape) each cache context ran last."""

    def __init__(self) -> None:
        self.managers: list[list[StateManager]] = []
        self.last: dict[str, tuple[int, tuple[int, ...]]] = {}

    def enter(self, stage: int, shape: tuple[int, ...]) -> None:
        try:
            name = self.managers[stage][0].context.name
        except ValueError:  # no cache context: the cache hook says so in diffusers' words
            return
        if self.last.get(name) != (stage, shape):
            # The blocks (or the batch) changed: this context's residuals and Taylor factors are stale.
            # Only this context's: StateManager.reset() would also drop the others' and the context itself.
            for managers in self.managers:
                for manager in managers:
                    manager._state_cache.pop(name, None)
            self.last[name] = (stage, shape)


class _StageSwitchHook(ModelHook):
    """On a stage's first block, outermost: tells `_StageCaches` which stage is about to run."""

    def __init__(self, caches: _StageCaches, stage: int):
        super().__init__()
        self.caches, self.stage = caches, stage

    def pre_forward(self, module, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.caches.enter(self.stage, tuple(x.shape))
        return args, kwargs


def _resolved_taylorseer(config: TaylorSeerCacheConfig, names: list[str], who: str) -> TaylorSeerCacheConfig:
    """The TaylorSeer config for one stage's blocks (named ``transformer_blocks.<j>``, ...): by
    default the last block's output (the residual stream the output layer reads) is predicted
    and the others' compute is skipped, so a predicted step runs no block."""
    if config.use_lite_mode:
        raise ValueError(f"{who}.enable_cache: TaylorSeerCacheConfig(use_lite_mode=True) caches the model's "
                         f"proj_out, which every stage of a mosaic shares; leave it False (a mosaic predicts its "
                         f"stage's last block output instead)")
    if config.cache_identifiers is None and config.skip_predict_identifiers is None:
        return dataclasses.replace(config, cache_identifiers=[re.escape(names[-1])],
                                   skip_predict_identifiers=[re.escape(n) for n in names[:-1]])
    return config


class MosaicCacheMixin(CacheMixin):
    r"""diffusers' ``CacheMixin`` for a stage-switching mosaic (see the module docstring).

    ``enable_cache`` takes `~diffusers.hooks.FirstBlockCacheConfig` or
    `~diffusers.hooks.TaylorSeerCacheConfig`; ``cache_context``, ``disable_cache`` and
    ``is_cache_enabled`` are diffusers'. A family lists a stage's blocks in `_cache_block_lists`.
    """

    #: Compact block classes called as ``block(image, text, ...) -> (image, text)`` (family hook).
    _cache_two_stream_blocks: ClassVar[tuple[type, ...]] = ()

    def _cache_block_lists(self, stage: int, config) -> dict[str, list[nn.Module]]:
        """A stage's blocks in call order under diffusers' list names (family hook; the blocks
        must be the modules the forward calls while a cache is on)."""
        return {"transformer_blocks": list(self.stage_blocks[stage])}

    def cache_stage_blocks(self, stage: int, name: str) -> list[nn.Module] | None:
        """The modules the forward calls for list `name` of `stage` while a cache is on (None: no cache)."""
        views = self.__dict__.get("_cache_views")
        return list(getattr(views[stage], name)) if views else None

    # ------------------------------------------------------------------ fusion off while hooks watch blocks

    @property
    def fuse_block_boundaries(self) -> bool:
        """Whether the stage forward fuses block boundaries: as set (`set_block_boundary_fusion`),
        except while a cache or a block counter watches the blocks' ``forward``."""
        return self.__dict__.get("_fusion_requested", True) and not self.__dict__.get("_block_watchers", 0)

    @fuse_block_boundaries.setter
    def fuse_block_boundaries(self, value: bool) -> None:
        self.__dict__["_fusion_requested"] = bool(value)

    def _watch_blocks(self, delta: int) -> None:
        self.__dict__["_block_watchers"] = self.__dict__.get("_block_watchers", 0) + delta
        if getattr(self, "_graphs", None) is not None:
            self._graphs.reset()

    def enable_cuda_graphs(self, enabled: bool = True):
        if enabled and (self.is_cache_enabled or self.__dict__.get("_block_watchers", 0)):
            raise RuntimeError(f"{type(self).__name__}: CUDA graphs cannot replay a cached forward (the cache "
                               f"decides on the host which blocks run); call disable_cache() first")
        return super().enable_cuda_graphs(enabled)

    # ------------------------------------------------------------------ diffusers' CacheMixin

    def enable_cache(self, config) -> None:
        r"""Apply a diffusers cache to every stage's blocks; a stage switch drops what it holds.

        Args:
            config (`FirstBlockCacheConfig` or `TaylorSeerCacheConfig`): as for a dense diffusers
                model. TaylorSeer without identifiers predicts each stage's last block output and
                skips the other blocks' compute on predicted steps; identifiers are matched against
                ``transformer_blocks.<j>`` (and ``single_transformer_blocks.<j>`` for Flux).

        Raises:
            ValueError: another config type, a cache already enabled, a first-block cache on a
                stage with fewer than 2 blocks, TaylorSeer ``use_lite_mode`` or identifiers that
                match no block of a stage.
            RuntimeError: CUDA graphs are enabled.
        """
        who = type(self).__name__
        if not isinstance(config, SUPPORTED_CONFIGS):
            raise ValueError(f"{who}.enable_cache: config must be a FirstBlockCacheConfig or TaylorSeerCacheConfig "
                             f"(diffusers.hooks), got {type(config).__name__}")
        if self.is_cache_enabled:
            raise ValueError(f"{who}.enable_cache: caching is already enabled with {type(self._cache_config).__name__}; "
                             f"call disable_cache() first")
        if self.cuda_graphs_enabled:
            raise RuntimeError(f"{who}.enable_cache: CUDA graphs cannot replay a cached forward; call "
                               f"enable_cuda_graphs(False) first")
        caches, views = _StageCaches(), []
        self.__dict__["_cache_views"] = views
        try:
            for stage in range(self.num_stages):
                view = _StageView(self._cache_block_lists(stage, config))
                views.append(view)
                blocks = view.blocks()
                for _, block in blocks:
                    _register_metadata(type(block), isinstance(block, (PairedJointBlock, *self._cache_two_stream_blocks)))
                if isinstance(config, FirstBlockCacheConfig):
                    if len(blocks) < 2:
                        raise ValueError(f"{who}.enable_cache: the first-block cache needs at least 2 blocks per stage, "
                                         f"stage {self.stage_names[stage]!r} has {len(blocks)}")
                    apply_first_block_cache(view, config)
                else:
                    apply_taylorseer_cache(view, _resolved_taylorseer(config, [n for n, _ in blocks], who))
                caches.managers.append(_managers(view))
                if not caches.managers[-1]:
                    raise ValueError(f"{who}.enable_cache: the TaylorSeer identifiers match no block of stage "
                                     f"{self.stage_names[stage]!r} (its blocks: {[n for n, _ in blocks]})")
                HookRegistry.check_if_exists_or_initialize(blocks[0][1]).register_hook(
                    _StageSwitchHook(caches, stage), _STAGE_HOOK)
        except Exception:
            self._remove_cache_hooks()
            raise
        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()
        self._cache_config = config
        self._watch_blocks(+1)

    def disable_cache(self) -> None:
        """Remove the cache hooks; the blocks run fused again (unless fusion was switched off)."""
        if self._cache_config is None:
            return super().disable_cache()  # diffusers' warning
        self._remove_cache_hooks()
        self._cache_config = None
        self._watch_blocks(-1)

    def reset_cache(self) -> None:
        """Forget what every cache context holds, before a new sampling run (what diffusers'
        pipelines do after each call, through ``_reset_stateful_cache``)."""
        self._reset_stateful_cache()

    def _remove_cache_hooks(self) -> None:
        for view in self.__dict__.pop("_cache_views", None) or ():
            for module in view.modules():  # the adapters are not in the mosaic's tree
                registry = getattr(module, "_diffusers_hook", None)
                for name in _CACHE_HOOKS if registry is not None else ():
                    registry.remove_hook(name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()


# ---------------------------------------------------------------------- counting block evaluations


@dataclasses.dataclass
class BlockEvaluations:
    """Block forwards that ran, per stage (a cache's skipped or predicted blocks are not counted).

    ``blocks`` counts forward calls; ``rows`` adds each call's batch rows (a CFG step of B images
    is one call of 2B rows), so ``rows / images`` is the block evaluations per image; ``weights``
    adds rows times the block's weight count (its GEMMs' multiply-adds per token), so stages of
    different widths compare (attention's token-pair products aside).
    """

    blocks: list[int]
    rows: list[int]
    weights: list[int]

    @property
    def total(self) -> int:
        return sum(self.blocks)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def total_weights(self) -> int:
        return sum(self.weights)


def _weight_count(block: nn.Module) -> int:
    """The floating-point weights a block's forward multiplies by (a shared-producer block's
    rows included: `weights()` gathers them)."""
    weights = block.weights() if callable(getattr(block, "weights", None)) else None
    if dataclasses.is_dataclass(weights):
        tensors = [getattr(weights, f.name) for f in dataclasses.fields(weights)]
    else:
        tensors = list(block.parameters())
    return int(sum(t.numel() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()))


class _CountHook(ModelHook):
    def __init__(self, counts: BlockEvaluations, stage: int, weights: int):
        super().__init__()
        self.counts, self.stage, self.size = counts, stage, weights

    def pre_forward(self, module, *args, **kwargs):
        rows = int((args[0] if args else next(iter(kwargs.values()))).shape[0])
        self.counts.blocks[self.stage] += 1
        self.counts.rows[self.stage] += rows
        self.counts.weights[self.stage] += rows * self.size
        return args, kwargs


def _register_innermost(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Register `hook` under the module's other hooks, so it sees only the calls they let through."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    outer = list(registry.hooks.items())  # registration order: innermost first
    for other, _ in reversed(outer):
        registry.remove_hook(other, recurse=False)
    registry.register_hook(hook, name)
    for other, h in outer:
        registry.register_hook(h, other)


@contextlib.contextmanager
def count_block_evaluations(model: MosaicCacheMixin) -> Iterator[BlockEvaluations]:
    """Count the compact block forwards of `model` that run inside the ``with`` block.

    The counter sits under any cache hook (enabled before or inside the block), so a block the
    cache skips is not counted; the blocks run unfused meanwhile (the counter sees ``forward``).

    Raises:
        TypeError: `model` is not a mosaic with `MosaicCacheMixin`.
        RuntimeError: CUDA graphs are enabled (a replay runs no hook).
    """
    if not isinstance(model, MosaicCacheMixin):
        raise TypeError(f"count_block_evaluations: model must be a mosaic with MosaicCacheMixin (a DiT or Flux "
                        f"mosaic), got {type(model).__name__}")
    if model.cuda_graphs_enabled:
        raise RuntimeError("count_block_evaluations: a CUDA graph replay runs no hook; call enable_cuda_graphs(False)")
    counts = BlockEvaluations(*([0] * model.num_stages for _ in range(3)))
    blocks = [(s, b) for s, stage in enumerate(model.stage_blocks) for b in stage]
    for s, block in blocks:
        _register_innermost(block, _CountHook(counts, s, _weight_count(block)), _COUNT_HOOK)
    model._watch_blocks(+1)
    try:
        yield counts
    finally:
        model._watch_blocks(-1)
        for _, block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_COUNT_HOOK, recurse=False)

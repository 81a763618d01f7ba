"""diffusers' caching hooks on mosaics (`mosaicdiff.core.block_cache`, issue 23 item 2).

The oracle of a cached mosaic is diffusers' own cache on the dense model: at sparsity 0 the
mosaic's blocks compute the dense blocks, so the same first-block cache (same threshold) must give
the same outputs at every step, reused steps included. The thresholds used are unambiguous:
0 (never reuse: also equal to no cache) and 1e9 (reuse whenever there is something to reuse).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch import nn
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff import families
from mosaicdiff.core.block_cache import PairedJointBlock, count_block_evaluations
from tests.families.conformance import three_stage_mosaic

ATOL, RTOL = 5e-5, 1e-5
ALWAYS, NEVER = 1e9, 0.0  # first-block cache thresholds: reuse whenever possible, never reuse
DIT, FLUX = (next(f for f in families.FAMILIES if f.name == name) for name in ("dit", "flux"))


def dit_dense(layers: int = 4):
    """The family's tiny DiT with `layers` blocks (its own 2 are too few to see a cache skip): the
    blocks after its 2 are a second tiny DiT's, all with the first's timestep/class embedder."""
    testing = DIT.testing_module()
    model, other = testing.tiny_dense(seed=0), testing.tiny_dense(seed=1)
    blocks = [*model.transformer_blocks, *other.transformer_blocks][:layers]
    embedder = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in blocks:
        block.norm1.emb.load_state_dict(embedder)
    model.transformer_blocks = nn.ModuleList(blocks)
    model.register_to_config(num_layers=layers)
    return model


class Kit:
    def __init__(self, family, dense):
        self.family, self.testing, self.dense = family, family.testing_module(), dense
        self.x, self.cond = self.testing.tiny_inputs(dense, 2)

    def t(self, t: float) -> torch.Tensor:
        return torch.full((self.x.shape[0],), float(t))  # (B,): the dense DiT takes no 0-d timestep

    def run(self, model, ts, context: str | None = "cond", x: torch.Tensor | None = None):
        """One forward of `x` (default the kit's) per timestep in `ts`, each in cache context
        `context` (None: the caller's), outputs stacked."""
        x, outs = self.x if x is None else x, []
        for t in ts:
            if context is not None and getattr(model, "is_cache_enabled", False):
                with model.cache_context(context):
                    outs.append(self.testing.call(model, x, self.t(t), self.cond))
            else:
                outs.append(self.testing.call(model, x, self.t(t), self.cond))
        return torch.stack(outs)


@pytest.fixture(params=["dit", "flux"])
def kit(request):
    return Kit(DIT, dit_dense()) if request.param == "dit" else Kit(FLUX, FLUX.testing_module().tiny_dense())


def unpruned(kit):
    return mosaicdiff.prune(kit.dense, None, 0.0, method="magnitude", align=None, progress=False)


#: Timesteps of a short trajectory through all three stages of `three_stage_mosaic` ([700, 1000), [300, 700), [0, 300)).
TRAJECTORY = (950, 900, 850, 600, 550, 500, 250, 200, 150)


@pytest.mark.parametrize("threshold", [NEVER, ALWAYS])
def test_the_sparsity_0_mosaic_caches_as_diffusers_caches_the_dense_model(kit, threshold):
    mosaic, dense = unpruned(kit), kit.dense
    ts = TRAJECTORY[:4]
    plain = kit.run(dense, ts)
    apply_first_block_cache(dense, FirstBlockCacheConfig(threshold=threshold))
    _set_cache_context(dense, CacheContext("cond"))  # the dense DiT has no CacheMixin
    expected = kit.run(dense, ts, context=None)
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    with count_block_evaluations(mosaic) as counts:
        got = kit.run(mosaic, ts)
    assert_close(got, expected, atol=ATOL, rtol=RTOL)
    n = len(mosaic.stage_blocks[0])
    if threshold == NEVER:  # never reusing is no cache at all
        assert_close(got, plain, atol=ATOL, rtol=RTOL)
        assert counts.blocks == [n * len(ts)]
    else:  # the first step runs every block, the others the first block only
        assert (got - plain).abs().amax() > 1e-3, "the cache reused nothing"
        assert counts.blocks == [n + len(ts) - 1]


def test_taylorseer_computing_every_step_equals_no_cache_and_its_predicted_steps_run_no_block(kit):
    mosaic = three_stage_mosaic(kit.family, kit.dense, share_producers=True)
    plain = kit.run(mosaic, TRAJECTORY)
    mosaic.enable_cache(TaylorSeerCacheConfig(cache_interval=1, taylor_factors_dtype=torch.float32))
    assert_close(kit.run(mosaic, TRAJECTORY), plain, atol=ATOL, rtol=RTOL)
    mosaic.disable_cache()
    # 3 steps per stage: with the stage-switch invalidation every stage warms up again: steps 0, 1 computed,
    # step 2 predicted (diffusers' schedule: warm-up steps, then one computed step every interval).
    mosaic.enable_cache(TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=2,
                                              taylor_factors_dtype=torch.float32))
    with count_block_evaluations(mosaic) as counts:
        cached = kit.run(mosaic, TRAJECTORY)
    assert counts.blocks == [2 * len(b) for b in mosaic.stage_blocks]
    assert torch.isfinite(cached).all() and (cached - plain).abs().amax() > 1e-4


def test_a_stage_switch_starts_the_first_block_cache_afresh(kit):
    """Every stage's first step runs all its blocks (its residuals are its own blocks'); the others
    reuse. The outputs of each stage's first step are the uncached ones."""
    mosaic = three_stage_mosaic(kit.family, kit.dense, share_producers=True)
    plain = kit.run(mosaic, TRAJECTORY)
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
    with count_block_evaluations(mosaic) as counts:
        cached = kit.run(mosaic, TRAJECTORY)
    assert counts.blocks == [len(b) + 2 for b in mosaic.stage_blocks]  # 3 steps per stage
    for first in (0, 3, 6):
        assert_close(cached[first], plain[first], atol=ATOL, rtol=RTOL)
    assert (cached[1] - plain[1]).abs().amax() > 1e-3


def test_a_stage_entered_again_does_not_reuse_what_it_cached_before(kit):
    """Fails if a stage switch keeps a stale cache: a second trajectory (other images) in the same
    cache context, no reset in between (``mosaicdiff.sample`` twice), enters the early stage again;
    without the invalidation its first step would reuse the first images' residuals, cached by the
    early stage's blocks two stage switches ago. With it, it is what a fresh cache gives."""
    mosaic = three_stage_mosaic(kit.family, kit.dense, share_producers=True)
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
    other = torch.randn(kit.x.shape, generator=torch.Generator().manual_seed(7))
    with mosaic.cache_context("cond"):
        kit.run(mosaic, TRAJECTORY, context=None)
        again = kit.run(mosaic, TRAJECTORY, context=None, x=other)
    mosaic.reset_cache()  # what a pipeline does after each run
    assert_close(again, kit.run(mosaic, TRAJECTORY, x=other), atol=ATOL, rtol=RTOL)
    # A mixed batch runs two stages in one forward: each switch drops the state, so it is as fresh.
    mosaic.reset_cache()
    with mosaic.cache_context("cond"):
        kit.run(mosaic, (950,), context=None)
        t = torch.tensor([900.0, 500.0])
        mixed = kit.testing.call(mosaic, kit.x, t, kit.cond)
    mosaic.disable_cache()
    assert_close(mixed, kit.testing.call(mosaic, kit.x, t, kit.cond), atol=ATOL, rtol=RTOL)


def test_cache_contexts_keep_their_own_state(kit):
    """CFG as two calls ("cond", "uncond"): each context reuses its own residuals, and a context's
    stage switch leaves the other's state alone until that one switches too."""
    mosaic = three_stage_mosaic(kit.family, kit.dense, share_producers=True)
    plain = kit.run(mosaic, TRAJECTORY)
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
    solo = kit.run(mosaic, TRAJECTORY)
    mosaic.reset_cache()
    both = []
    for t in TRAJECTORY:
        for context in ("cond", "uncond"):
            with mosaic.cache_context(context):
                both.append(kit.testing.call(mosaic, kit.x, kit.t(t), kit.cond))
    assert_close(torch.stack(both[0::2]), solo, atol=ATOL, rtol=RTOL)
    assert_close(torch.stack(both[1::2]), solo, atol=ATOL, rtol=RTOL)
    assert (solo - plain).abs().amax() > 1e-3


def test_disable_cache_restores_the_fused_uncached_forward(kit):
    mosaic = three_stage_mosaic(kit.family, kit.dense, share_producers=True)
    plain = kit.run(mosaic, TRAJECTORY[:3])
    assert mosaic.fuse_block_boundaries and not mosaic.is_cache_enabled
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
    assert not mosaic.fuse_block_boundaries and mosaic.is_cache_enabled
    kit.run(mosaic, TRAJECTORY[:3])
    mosaic.disable_cache()
    assert mosaic.fuse_block_boundaries and not mosaic.is_cache_enabled
    hooked = [m for m in mosaic.modules() if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]
    assert not hooked, hooked
    assert_close(kit.run(mosaic, TRAJECTORY[:3]), plain, atol=ATOL, rtol=RTOL)
    mosaic.set_block_boundary_fusion(False)  # the user's choice survives a cache
    mosaic.enable_cache(TaylorSeerCacheConfig())
    mosaic.disable_cache()
    assert not mosaic.fuse_block_boundaries


def test_counting_sees_every_block_without_a_cache():
    kit = Kit(DIT, dit_dense())
    mosaic = three_stage_mosaic(DIT, kit.dense, share_producers=True)
    with count_block_evaluations(mosaic) as counts:
        kit.run(mosaic, TRAJECTORY)
    assert counts.blocks == [3 * len(b) for b in mosaic.stage_blocks]
    assert counts.rows == [2 * c for c in counts.blocks]  # the kit's batch: 2 rows
    # a pruned stage's blocks hold fewer weights than the unpruned model's
    dense_weights = count_weights_per_block(unpruned(kit))
    assert all(w < 2 * 3 * len(b) * dense_weights for w, b in zip(counts.weights, mosaic.stage_blocks))
    assert mosaic.fuse_block_boundaries


def count_weights_per_block(mosaic) -> int:
    with count_block_evaluations(mosaic) as counts:
        Kit(DIT, dit_dense()).run(mosaic, (500,))
    return counts.total_weights // counts.total_rows


def test_flux_single_blocks_run_paired_under_the_first_block_cache_only():
    kit = Kit(FLUX, FLUX.testing_module().tiny_dense())
    mosaic = unpruned(kit)
    mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
    assert all(isinstance(b, PairedJointBlock) for b in mosaic.cache_stage_blocks(0, "single_transformer_blocks"))
    mosaic.disable_cache()
    assert mosaic.cache_stage_blocks(0, "single_transformer_blocks") is None
    mosaic.enable_cache(TaylorSeerCacheConfig())
    assert not any(isinstance(b, PairedJointBlock) for b in mosaic.cache_stage_blocks(0, "single_transformer_blocks"))


def test_bad_cache_requests_say_what_is_accepted():
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    kit = Kit(DIT, dit_dense())
    mosaic = three_stage_mosaic(DIT, kit.dense, share_producers=True)
    with pytest.raises(ValueError, match="FirstBlockCacheConfig or TaylorSeerCacheConfig"):
        mosaic.enable_cache(PyramidAttentionBroadcastConfig())
    with pytest.raises(ValueError, match="use_lite_mode"):
        mosaic.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
    with pytest.raises(ValueError, match="match no block"):
        mosaic.enable_cache(TaylorSeerCacheConfig(cache_identifiers=["^nothing$"]))
    assert not mosaic.is_cache_enabled and mosaic.fuse_block_boundaries  # failed attempts leave no hook
    mosaic.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="already enabled"):
        mosaic.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(RuntimeError, match="CUDA graphs"):
        mosaic.enable_cuda_graphs()
    with pytest.raises(ValueError, match="cache_context"):  # diffusers' own message
        kit.testing.call(mosaic, kit.x, kit.t(500), kit.cond)
    with pytest.raises(TypeError, match="MosaicCacheMixin"):
        with count_block_evaluations(kit.dense):
            pass
    one_block = three_stage_mosaic(DIT, dit_dense(layers=1), share_producers=True)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        one_block.enable_cache(FirstBlockCacheConfig())


def test_a_counter_started_before_the_cache_sees_only_the_blocks_that_run():
    kit = Kit(DIT, dit_dense())
    mosaic = three_stage_mosaic(DIT, kit.dense, share_producers=True)
    with count_block_evaluations(mosaic) as counts:
        mosaic.enable_cache(FirstBlockCacheConfig(threshold=ALWAYS))
        kit.run(mosaic, TRAJECTORY)
        mosaic.disable_cache()
        assert not mosaic.fuse_block_boundaries  # still counting
    assert counts.blocks == [len(b) + 2 for b in mosaic.stage_blocks]
    assert mosaic.fuse_block_boundaries

"""Models and plain-torch ops shared by the GPU benchmarks (suite_context.py, suite_e2e.py, bench_kernels.py).

- `DIT_XL2` / `DIT_TINY`: diffusers ``DiTTransformer2DModel`` configs (the real DiT-XL/2 shapes,
  and a tiny one for ``--dry-run`` on the CPU);
- `build_dense`: a randomly initialised model (speed does not depend on weight values) with 28
  identical embedders, as converted DiT-XL/2 checkpoints have;
- `timing_mosaic`: a `MosaicDiT` (shared producers, or copies per stage) with the real divide + allocate shapes (stage boundaries from
  the linear schedule, per-stage sparsity from the target mean, aligned widths); the kept heads
  are magnitude-selected, because timing does not depend on which are kept and OBS over
  28 x 3 blocks would spend the GPU lease on calibration;
- `stepwise_timing_stages`: the same for ``method="stepwise"`` (K stages of equal step counts),
  with the allocation run on a fixed sensitivity curve instead of a probe of the model;
- `plain_torch_ops`: swaps the fused mosaic ops for plain torch in the input dtype (F.linear,
  tanh-GELU, F.layer_norm, SDPA): the same math the engine runs, for torch.compile to fuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mosaic_kernels import ops

DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
DIT_TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
NUM_STEPS = 50


def build_dense(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight ``DiTTransformer2DModel`` on ``device`` in ``dtype`` (initialised there)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the host
        model = DiTTransformer2DModel(**cfg)
    emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def timing_stages(dense, target: float, num_steps: int = NUM_STEPS):
    """The real divide/allocate shapes with magnitude-selected, nested kept sets (timing only)."""
    from mosaicdiff.api import prune_stages

    return prune_stages(dense, None, target, method="mosaic", pruner="magnitude", num_inference_steps=num_steps,
                        progress=False)


#: The fixed sensitivity curve of `stepwise_timing_stages`: the last (least noisy) window this many
#: times as sensitive as the first, geometric in between (the direction docs/results.md measured on
#: the digits DiT: pruning the last steps costs the most).
STEPWISE_SENSITIVITY_SPAN = 10.0


def stepwise_timing_sparsities(target: float, num_stages: int, num_steps: int = NUM_STEPS) -> list[float]:
    """Per-stage sparsities of ``method="stepwise"`` at mean `target`: its allocation
    (`mosaicdiff.method.step_allocation.allocate_exponential`, default exchange rate and cap) of
    the fixed curve ``geomspace(1, STEPWISE_SENSITIVITY_SPAN, num_stages)`` in place of the probed
    errors (a probe needs calibration data, and random weights have no sensitivity to read)."""
    import numpy as np

    from mosaicdiff.core.schedulers import sampler_timesteps
    from mosaicdiff.method.stage_plan import plan_stages

    curve = np.geomspace(1.0, STEPWISE_SENSITIVITY_SPAN, int(num_stages)).tolist()
    planned, _ = plan_stages(target, method="stepwise", num_stages=num_stages, sensitivities=curve,
                             timesteps=sampler_timesteps(num_steps))
    return [sp for *_, sp in planned]


def stepwise_timing_stages(dense, target: float, num_stages: int, num_steps: int = NUM_STEPS):
    """The shapes of a K-stage stepwise mosaic (`stepwise_timing_sparsities`), magnitude-selected
    and nested as `mosaicdiff.prune` nests them (timing only)."""
    from mosaicdiff.api import prune_stages

    return prune_stages(dense, None, target, method="stepwise", num_stages=num_stages, pruner="magnitude",
                        stage_sparsities=stepwise_timing_sparsities(target, num_stages, num_steps),
                        num_inference_steps=num_steps, progress=False)


def timing_mosaic(dense, target: float, num_steps: int = NUM_STEPS, share_producers: bool = True, stages=None):
    """A mosaic of `timing_stages`: with shared producer storage (the default layout) or with a copy
    of the producers per stage (the same kept sets: only the memory layout differs)."""
    from mosaicdiff.families.dit.model import MosaicDiT

    stages = timing_stages(dense, target, num_steps) if stages is None else stages
    return MosaicDiT.from_dense(dense, stages, share_producers=share_producers,
                                meta={"method": "timing-only magnitude", "target_sparsity": target})


# ------------------------------------------------------------------ plain torch, input dtype

#: op name -> the op in plain torch in the input dtype (each op's ``BenchCase.eager``).
TORCH_OPS = {name: case.eager for name, case in ops.BENCH_CASES.items() if case.eager is not None}


@contextlib.contextmanager
def plain_torch_ops() -> Iterator[None]:
    """Replace ``mosaic_kernels.ops.<op>`` by `TORCH_OPS` (what torch.compile then traces)."""
    saved = {name: getattr(ops, name) for name in TORCH_OPS}
    try:
        for name, fn in TORCH_OPS.items():
            setattr(ops, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)

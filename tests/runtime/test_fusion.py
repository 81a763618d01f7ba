"""Block-boundary fusion: fc2's gated residual fused with the next norm (fp32, CPU).

`MosaicDiT.forward_stage` chains `CompactDiTBlock.forward_normed`, so each block boundary (and
the last block's boundary with the final layer's norm) is one ``gated_residual_ln_modulate``.
Checked against diffusers (through the zeroed dense reference), against the unfused chain, and
by counting the ops that ran.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaic_kernels import ops
from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.core.stages import StageSpec
from tests.runtime.dit_helpers import ATOL, HEAD_DIM, HEADS, LAYERS, RTOL, inputs, sliced_block, tiny_dit, zeroed_reference

MLP = 4 * HEADS * HEAD_DIM
# One stage whose blocks exercise every branch: block 0 keeps no head, block 1 no MLP channel.
EDGE_PLAN = ([[], [0, 2]], [list(range(0, MLP, 3)), []])


def _edge_mosaic(dense) -> MosaicDiT:
    heads, channels = EDGE_PLAN
    blocks = [sliced_block(b, h, c) for b, h, c in zip(dense.transformer_blocks, heads, channels)]
    return MosaicDiT.from_dense(dense, [StageSpec("all", 0, 1000, 0.5, blocks)])


def _run(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


@pytest.mark.parametrize("edge", [False, True], ids=["unpruned", "no-head-and-no-mlp-blocks"])
def test_fused_chain_matches_diffusers_and_unfused(edge):
    dense = tiny_dit()
    mosaic = _edge_mosaic(dense) if edge else MosaicDiT.from_dense_unpruned(dense)
    ref = zeroed_reference(dense, *EDGE_PLAN) if edge else dense
    x, labels = inputs(batch=3)
    t = torch.tensor([5, 480, 990])
    assert mosaic.fuse_block_boundaries, "fusion is the default"
    fused = _run(mosaic, x, t, labels)
    assert_close(fused, _run(ref, x, t, labels), atol=ATOL, rtol=RTOL, msg=lambda m: f"fused vs diffusers: {m}")
    unfused = _run(mosaic.set_block_boundary_fusion(False), x, t, labels)
    assert_close(fused, unfused, atol=ATOL, rtol=RTOL, msg=lambda m: f"fused vs unfused chain: {m}")


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_one_residual_pass_per_block_boundary(fuse):
    """Fused: one norm at the start, then one gated_residual_ln_modulate per sub-block boundary."""
    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense_unpruned(dense).set_block_boundary_fusion(fuse)
    x, labels = inputs(batch=2)
    with ops.record_dispatch() as calls:
        _run(mosaic, x, 100, labels)
    by_op = {op: n for (op, _), n in calls.items() if op != "attention"}
    assert sum(n for (op, _), n in calls.items() if op == "attention") == LAYERS
    if fuse:
        assert by_op == {"ln_modulate": 1, "gated_residual_ln_modulate": 2 * LAYERS, "linear_gelu": LAYERS}, by_op
    else:
        assert by_op == {"ln_modulate": LAYERS + 1, "gated_residual_ln_modulate": LAYERS,
                         "linear_gelu": LAYERS, "linear_gated_residual": LAYERS}, by_op


def test_stage_kernel_shapes_follow_the_fusion():
    mosaic = _edge_mosaic(tiny_dit())
    fused_ops = {op for op, _, _ in mosaic.stage_kernel_shapes(0, 2, 16, torch.float32)}
    assert fused_ops == {"ln_modulate", "gated_residual_ln_modulate", "linear_gelu", "attention"}
    mosaic.set_block_boundary_fusion(False)
    unfused_ops = {op for op, _, _ in mosaic.stage_kernel_shapes(0, 2, 16, torch.float32)}
    assert unfused_ops == fused_ops | {"linear_gated_residual", "gated_residual"}

"""Kernel configs per distinct stage shape: stages whose kernel shapes are identical share their
configs, so `autotune_kernels` tunes each (op, shape, dtype) once over all stages and entering a
stage with the previous stage's shapes selects nothing again.

The stages sharing widths are known by construction (hand-sliced widths, or the stepwise method
with equal per-stage sparsities), not read back from the function under test.
"""

from __future__ import annotations

import pytest
import torch

from mosaic_kernels import configs
from mosaicdiff.api import prune_stages
from mosaicdiff.core.stages import StageSpec
from mosaicdiff.families.dit.model import MosaicDiT
from tests.runtime.dit_helpers import inputs, sliced_block, tiny_dit

MLP = 128  # tiny_dit: 4 heads x 8, MLP 4 x 32
#: name -> (t_start, t_end, kept heads per block, kept MLP channels per block). "early" and
#: "middle" keep different units in the same numbers (same widths, other weights); "late" differs.
PLAN = {
    "early": (700, 1000, [[0, 1], [2]], [list(range(0, MLP, 2)), list(range(0, MLP, 4))]),
    "middle": (300, 700, [[2, 3], [0]], [list(range(1, MLP, 2)), list(range(1, MLP, 4))]),
    "late": (0, 300, [[0, 1, 3], [0, 2, 3]], [list(range(96)), list(range(32, MLP))]),
}
TOKENS = 16  # sample 8, patch 2


def hand_mosaic() -> MosaicDiT:
    dense = tiny_dit()
    specs = [StageSpec(name, t0, t1, 0.5, [sliced_block(b, h, c) for b, h, c in zip(dense.transformer_blocks, hs, cs)])
             for name, (t0, t1, hs, cs) in PLAN.items()]
    return MosaicDiT.from_dense(dense, specs, share_producers=False)


def stepwise_mosaic() -> MosaicDiT:
    """Four stepwise stages (equal DDIM-50 step counts) at sparsities 0.5, 0.5, 0.25, 0.25: the
    first two and the last two have equal widths (magnitude selection: no calibration)."""
    dense = tiny_dit()
    stages = prune_stages(dense, None, 0.375, method="stepwise", num_stages=4, stage_sparsities=[0.5, 0.5, 0.25, 0.25],
                          pruner="magnitude", align=None, progress=False)
    return MosaicDiT.from_dense(dense, stages)


class SelectRecorder:
    """Stands in for `configs.select_configs_for_shapes`: records every call's items and `tune`,
    then resolves them with the real function, untuned (CPU)."""

    def __init__(self):
        self.calls: list[tuple[list, bool]] = []
        self._real = configs.select_configs_for_shapes

    def __call__(self, items, device=None, *, tune=False):
        items = list(items)
        self.calls.append((items, tune))
        return self._real(items, device)


@pytest.fixture
def recorder(monkeypatch):
    rec = SelectRecorder()
    monkeypatch.setattr(configs, "select_configs_for_shapes", rec)
    return rec


def test_hand_built_stages_sharing_widths_form_one_group():
    mosaic = hand_mosaic()
    early, middle, late = (mosaic.stage_names.index(n) for n in ("early", "middle", "late"))
    groups = mosaic.stage_shape_groups(2, TOKENS, torch.float32)
    assert sorted(sorted(g) for g in groups) == sorted([sorted([early, middle]), [late]])
    assert all(g == sorted(g) for g in groups) and [g[0] for g in groups] == sorted(g[0] for g in groups)


def test_stepwise_stages_with_equal_sparsities_share_shapes():
    mosaic = stepwise_mosaic()
    assert mosaic.stage_names == ["s0", "s1", "s2", "s3"]
    assert mosaic.stage_shape_groups(4, TOKENS, torch.float32) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("build", [hand_mosaic, stepwise_mosaic], ids=["hand", "stepwise"])
def test_autotune_tunes_every_distinct_shape_once(recorder, build):
    mosaic = build()
    ops = ("attention", "linear_gelu")
    chosen = mosaic.autotune_kernels(2, TOKENS, torch.float32, ops=ops)
    tuned = [item for items, tune in recorder.calls if tune for item in items]
    assert len(tuned) == len(set(tuned)), f"a shape was tuned twice: {tuned}"
    want = {it for s in range(mosaic.num_stages) for it in mosaic.stage_kernel_shapes(s, 2, TOKENS, torch.float32)
            if it[0] in ops}
    assert set(tuned) == want
    assert set(chosen) == {configs.config_key(op, shape, dt, "cpu") for op, shape, dt in want}


def test_entering_a_stage_with_the_previous_stages_shapes_selects_nothing(recorder):
    mosaic = hand_mosaic()
    seen = []
    mosaic.on_stage_change = lambda index, name: seen.append(name)
    x, labels = inputs(batch=2)
    with torch.no_grad():
        for t in (900, 500, 100, 500, 500):  # early, middle (same shapes), late, middle, middle
            mosaic(x, timestep=t, class_labels=labels)
    assert seen == ["early", "middle", "late", "middle"], "the hook fires on every stage change"
    selected = [items for items, _ in recorder.calls]
    names = mosaic.stage_names
    shapes = {n: mosaic.stage_kernel_shapes(names.index(n), 2, TOKENS, torch.float32) for n in ("early", "late")}
    assert selected == [shapes["early"], shapes["late"], shapes["early"]], \
        "early, then late, then middle (late's shapes differ): middle after early selects nothing"


def test_a_changed_batch_in_the_same_stage_selects_again(recorder):
    mosaic = hand_mosaic()
    with torch.no_grad():
        for batch in (2, 4):
            x, labels = inputs(batch=batch)
            mosaic(x, timestep=900, class_labels=labels)
    assert [items[0][1][0] for items, _ in recorder.calls if items[0][0] == "attention"] == [2, 4]


def test_a_quantized_stage_selects_and_tunes_no_bf16_gemm_configs(recorder):
    """Its GEMMs run as ``fp8_gemm``, which has no per-shape config: only the other ops are selected."""
    import mosaicdiff
    from mosaicdiff.core.runtime import GEMM_OPS

    mosaic = hand_mosaic()
    x, labels = inputs(batch=2)
    with torch.no_grad():
        mosaic(x, timestep=900, class_labels=labels)
    assert any(op in GEMM_OPS for op, _, _ in recorder.calls[-1][0]), "the unquantized stage selects its GEMMs"
    mosaicdiff.quantize(mosaic, "fp8")
    recorder.calls.clear()
    with torch.no_grad():
        mosaic(x, timestep=100, class_labels=labels)
    mosaic.autotune_kernels(2, TOKENS, torch.float32, ops=("attention", "linear_gelu"))
    assert recorder.calls and all(op not in GEMM_OPS for items, _ in recorder.calls for op, _, _ in items)
    assert any(op == "attention" for items, _ in recorder.calls for op, _, _ in items)

"""Shared producer storage: every stage's qkv/fc1 rows are views of one tensor per block position.

Oracle: slicing without compensation equals the dense model with the dropped units' consumer
columns zeroed (`zeroed_reference`), and a copy-per-stage mosaic of the same kept sets.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.families.dit.producers import SharedProducerBlock
from mosaicdiff.core.stages import StageSpec
from tests.runtime.dit_helpers import ATOL, HEAD_DIM, HEADS, RTOL, inputs, sliced_block, two_stage_specs, \
    zeroed_reference

MLP = 4 * HEADS * HEAD_DIM

#: Three stages as `prune(share_producers=True)` makes them: early and late keep subsets of the
#: middle stage's heads/channels (in any order: the storage order is the mosaic's business).
NESTED = {
    "late": (0, 300, ([[3, 0], [2]], [list(range(0, MLP, 4)), list(range(40, 90))])),
    "middle": (300, 700, ([[0, 1, 3], [2, 1, 0]], [list(range(0, MLP, 2)), list(range(10, 100))])),
    "early": (700, 1000, ([[1, 3], [1, 2]], [list(range(2, MLP, 4)), list(range(60, 100))])),
}


def nested_specs(dense) -> list[StageSpec]:
    return [StageSpec(name, t0, t1, 0.5, [sliced_block(b, h, c) for b, h, c in zip(dense.transformer_blocks, *plan)])
            for name, (t0, t1, plan) in NESTED.items()]


@pytest.fixture
def shared(dense):
    return MosaicDiT.from_dense(dense, nested_specs(dense), share_producers=True)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-boundaries", "per-block"])
def test_every_stage_equals_the_zeroed_dense_reference(dense, shared, fuse):
    shared.fuse_block_boundaries = fuse
    x, labels = inputs()
    for name, (t0, t1, (heads, channels)) in NESTED.items():
        ref = zeroed_reference(dense, heads, channels)
        t = torch.full((x.shape[0],), (t0 + t1) // 2)
        with torch.no_grad():
            want = ref(x, timestep=t, class_labels=labels).sample
            got = shared(x, timestep=t, class_labels=labels).sample
        assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"stage {name}\n{m}")


def test_outputs_equal_the_copy_per_stage_mosaic(dense, shared):
    copies = MosaicDiT.from_dense(dense, nested_specs(dense), share_producers=False)
    assert all(type(b).__name__ == "CompactDiTBlock" for s in copies.stage_blocks for b in s)
    x, labels = inputs()
    for t in (100, 500, 900):
        tt = torch.full((x.shape[0],), t)
        with torch.no_grad():
            assert_close(shared(x, tt, labels).sample, copies(x, tt, labels).sample, atol=ATOL, rtol=RTOL)
    assert shared.memory_report()["mosaic_bytes"] < copies.memory_report()["mosaic_bytes"]


def _views_of_storage(model) -> None:
    for j, store in enumerate(model.producer_storage):
        for stage in model.stage_blocks:
            block = stage[j]
            assert isinstance(block, SharedProducerBlock) and block.producers is store
            for ((w, b, _),), (sw, sb) in ((block.operands("qkv"), (store.qkv_weight, store.qkv_bias)),
                                          (block.operands("fc1"), (store.fc1_weight, store.fc1_bias))):
                assert w.untyped_storage().data_ptr() == sw.untyped_storage().data_ptr()
                assert b.untyped_storage().data_ptr() == sb.untyped_storage().data_ptr()
                assert w.is_contiguous() and w.dtype == sw.dtype


def test_every_stage_reads_its_producers_from_one_storage(shared):
    _views_of_storage(shared)
    for j, store in enumerate(shared.producer_storage):  # the storage holds the union, once
        union_h = set().union(*(set(plan[0][j]) for _, _, plan in NESTED.values()))
        union_c = set().union(*(set(plan[1][j]) for _, _, plan in NESTED.values()))
        assert sorted(store.heads.tolist()) == sorted(union_h)
        assert sorted(store.channels.tolist()) == sorted(union_c)
        assert store.qkv_weight.shape[0] == 3 * HEAD_DIM * len(union_h)
    keys = shared.state_dict().keys()
    assert not [k for k in keys if k.startswith("stage_blocks") and ("qkv" in k or "fc1" in k)]
    assert len([k for k in keys if k.startswith("producer_storage")]) == 4 * len(shared.producer_storage)


def test_weights_give_back_each_stage_in_the_common_layout(dense, shared):
    """`stages` re-lays qkv out as [q | k | v]: equal to slicing the dense block in the same order."""
    for spec in shared.stages:
        for block, w in zip(dense.transformer_blocks, spec.blocks):
            want = sliced_block(block, w.kept_heads.tolist(), w.kept_channels.tolist())
            for name, t in want.tensors().items():
                assert torch.equal(getattr(w, name), t), (spec.name, name)


def test_save_and_load_keep_the_sharing(shared, tmp_path):
    shared.save_pretrained(tmp_path / "m")
    loaded = MosaicDiT.from_pretrained(tmp_path / "m")
    _views_of_storage(loaded)
    assert loaded.memory_report() == shared.memory_report()
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("producer_storage.0.") for k in keys) == 4
    assert not [k for k in keys if ".qkv_weight" in k and k.startswith("stage_blocks")]
    x, labels = inputs()
    for t in (100, 500, 900):
        tt = torch.full((x.shape[0],), t)
        with torch.no_grad():
            assert_close(loaded(x, tt, labels).sample, shared(x, tt, labels).sample, atol=0, rtol=0)


def test_casts_moves_and_copies_keep_the_sharing(shared):
    half = copy.deepcopy(shared).to(torch.bfloat16)
    _views_of_storage(half)
    assert half.producer_storage[0].qkv_weight.dtype == torch.bfloat16
    assert half.memory_report()["mosaic_bytes"] * 2 == shared.memory_report()["mosaic_bytes"]
    _views_of_storage(shared)  # the original is untouched


def test_sharing_is_refused_or_skipped_when_the_kept_sets_do_not_nest(dense):
    specs = two_stage_specs(dense)  # block 1: heads [2] and [0, 3], neither contains the other
    with pytest.raises(ValueError, match="cannot share one storage"):
        MosaicDiT.from_dense(dense, specs, share_producers=True)
    auto = MosaicDiT.from_dense(dense, specs)
    assert auto.producer_storage is None and auto.config.shared_producers is None


def test_a_config_whose_stage_is_not_a_run_of_the_storage_is_refused(shared, tmp_path):
    shared.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    heads = cfg["shared_producers"][0]["heads"]
    cfg["stages"][0]["blocks"][0]["kept_heads"] = [heads[0], heads[-1]]  # not adjacent in storage
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="position 0 do not fit shared_producers"):
        MosaicDiT.from_pretrained(tmp_path / "m")
    cfg["stages"][0]["blocks"][0]["kept_heads"] = heads[:2]
    cfg["shared_producers"][0]["heads"] = [heads[0], heads[0], *heads[1:]]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shared_producers\[0\].heads must be unique indices"):
        MosaicDiT.from_pretrained(tmp_path / "m")
    cfg["shared_producers"] = [{"heads": "x"}]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shared_producers must be"):
        MosaicDiT.from_pretrained(tmp_path / "m")

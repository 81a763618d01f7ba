"""Shared producer storage of `MosaicUNet` (`mosaicdiff.families.unet.producers`) against per-stage copies.

The oracle is the copy mosaic of the same stages (every stage owning its q/k/v, kv2 and GEGLU ff1
rows, as before sharing), run through the SDXL pipeline; the memory saving is checked against the
producer sizes counted from the kept sets alone. Three stages of diffusers' tiny SDXL test U-Net
pruned with ``share_producers=True`` (magnitude selection, no calibration): the middle stage keeps
the most units and the others subsets of them, so each stage reads a different run of the storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff.families.unet.model import MosaicUNet
from mosaicdiff.api import prune_stages
from mosaicdiff.families.unet.blocks import CompactUNetBlock
from mosaicdiff.families.unet.producers import CONSUMER_FIELDS, PRODUCER_FIELDS, SharedUNetBlock
from tests.method.test_unet_adapter import TEXT, tiny_unet, unet_inputs
from tests.runtime.test_mosaic_unet import _pipeline

#: A format-1.0 folder (stages store copies) written by the code before format 2.0: a 3-stage
#: magnitude mosaic at 0.4 (boundaries 198 / 783) of a smaller relative of the tiny U-Net
#: (block_out_channels (8, 16), 8 transformer blocks of width 16, 4 heads of 4, text width 16),
#: saved in float16; the outputs are of that folder loaded in float32 then, for `LEGACY_INPUTS`.
LEGACY = Path(__file__).parent / "data" / "unet_format_1_0"


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def stages(unet):
    return prune_stages(unet, None, 0.4, pruner="magnitude", boundaries=(198, 783), align=None, progress=False,
                        share_producers=True)


@pytest.fixture(scope="module")
def shared(unet, stages):
    return MosaicUNet.from_dense(unet, stages, share_producers=True)


@pytest.fixture(scope="module")
def copies(unet, stages):
    return MosaicUNet.from_dense(unet, stages, share_producers=False)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte addresses a contiguous tensor covers."""
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _views(block: SharedUNetBlock) -> list[torch.Tensor]:
    return [t for name in ("qkv1", "q2", "kv2", "ff1") for rows in block.operands(name) for t in rows[:2]]


def test_layouts(shared, copies):
    assert all(isinstance(b, SharedUNetBlock) for s in shared.stage_blocks for b in s)
    assert all(type(b) is CompactUNetBlock for s in copies.stage_blocks for b in s) and copies.producer_storage is None
    sizes = [[b.heads + (b.mlp_width,) for b in s] for s in shared.stage_blocks]
    assert sizes[0] != sizes[1] and sizes[1] != sizes[2], "the stages keep different widths"


def test_shared_mosaic_equals_the_copy_mosaic_in_the_sdxl_pipeline(shared, copies):
    """Same kept sets, same numbers: a 4-step Euler run (t = 999, 666, 333, 0: every stage) in fp32."""
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 7, TEXT, generator=g), torch.randn(1, 32, generator=g)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
              negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=4, output_type="latent",
              height=32, width=32, guidance_scale=5.0)
    out = {}
    for name, mosaic in (("shared", shared), ("copies", copies)):
        pipe = _pipeline(mosaic, "euler")
        seen = []
        hook = mosaic.register_forward_pre_hook(lambda m, args: seen.append(m.stage_for(args[1])))
        try:
            out[name] = pipe(generator=torch.Generator().manual_seed(1), **kw).images
        finally:
            hook.remove()
        assert set(seen) == {0, 1, 2}, seen
    assert_close(out["shared"], out["copies"], atol=1e-5 * float(out["copies"].abs().max()), rtol=1e-5)


def test_each_stage_block_equals_its_copy(shared, copies):
    """Block by block, every stage: the shared block's forward against the copy block's."""
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, 7, TEXT, generator=g)
    for i, (s_blocks, c_blocks) in enumerate(zip(shared.stage_blocks, copies.stage_blocks)):
        for j, (s, c) in enumerate(zip(s_blocks, c_blocks)):
            assert sorted(s.kept_heads1.tolist()) == sorted(c.kept_heads1.tolist())
            h = torch.randn(2, 12, c.out1_bias.numel(), generator=g)
            with torch.no_grad():
                assert_close(s(h, encoder_hidden_states=text), c(h, encoder_hidden_states=text), atol=1e-5,
                             rtol=1e-5, msg=lambda m: f"stage {i} block {j}: {m}")


def test_every_stage_reads_views_of_one_storage(shared):
    for j, store in enumerate(shared.producer_storage):
        blocks = [stage[j] for stage in shared.stage_blocks]
        spans = {name: _span(getattr(store, name)) for name in PRODUCER_FIELDS}
        runs = set()
        for b in blocks:
            assert b.producers is store
            assert {n for n, _ in b.named_parameters()} == set(CONSUMER_FIELDS), "a block owns no producer"
            for view, name in zip(_views(b), ("qkv1_weight", "qkv1_bias", "q2_weight", "q2_bias", "kv2_weight",
                                              "kv2_bias", "ff1_weight", "ff1_bias", "ff1_weight", "ff1_bias")):
                (lo, hi), (start, end) = spans[name], _span(view)
                assert lo <= start and end <= hi, f"block {j}: {name} view outside its storage"
                assert view.is_contiguous(), "a run of rows is a dense GEMM operand"
            (value_w, _, _), (gate_w, _, _) = b.operands("ff1")
            f_total = store.channels.numel()
            assert gate_w.data_ptr() - value_w.data_ptr() == f_total * value_w.stride(0) * value_w.element_size()
            qkv1 = b.operands("qkv1")[0].weight
            runs.add((qkv1.data_ptr(), qkv1.numel()))
        assert len(runs) == len({b.heads[0] for b in blocks}), "stages of different widths read different runs"
    keys = list(shared.state_dict())
    assert not [k for k in keys if k.startswith("stage_blocks") and k.rsplit(".", 1)[1] in PRODUCER_FIELDS]
    stored = [k for k in keys if k.startswith("producer_storage.")]
    assert len(stored) == len(PRODUCER_FIELDS) * len(shared.producer_storage)


def _producer_elements(h1: int, h2: int, f: int, hd: int, width: int, text: int) -> int:
    """qkv1, q2, kv2 and ff1 (value + gate) weights and biases for these unit counts."""
    return 3 * h1 * hd * (width + 1) + h2 * hd * (width + 1) + 2 * h2 * hd * (text + 1) + 2 * f * (width + 1)


def test_memory_report_saving_is_exactly_the_producer_rows_not_copied(shared, copies, unet):
    from mosaicdiff.families.unet.adapter import transformer_blocks

    dense_blocks = transformer_blocks(unet)
    saving = 0
    for j, dense in enumerate(dense_blocks):
        hd, width = dense.attn1.inner_dim // dense.attn1.heads, dense.norm1.weight.numel()
        kept = [spec["blocks"][j] for spec in shared.config.stages]
        per_stage = sum(_producer_elements(len(k["kept_heads1"]), len(k["kept_heads2"]), len(k["kept_channels"]), hd,
                                           width, TEXT) for k in kept)
        union = [len(set().union(*(k[key] for k in kept))) for key in ("kept_heads1", "kept_heads2", "kept_channels")]
        saving += per_stage - _producer_elements(*union, hd, width, TEXT)
    a, b = shared.memory_report(), copies.memory_report()
    assert saving > 0 and b["mosaic_params"] - a["mosaic_params"] == saving
    assert a["producer_params"] == sum(p.numel() for p in shared.producer_storage.parameters())
    assert a["mosaic_params"] == sum(p.numel() for p in shared.parameters()), "every tensor counted once"
    assert b["producer_params"] == 0 and a["shared_params"] == b["shared_params"]


def test_save_and_load_round_trip_stores_each_tensor_once(shared, tmp_path):
    shared.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format_version"] == "2.0" and len(cfg["shared_producers"]) == len(shared.producer_storage)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("producer_storage.") for k in keys) == len(PRODUCER_FIELDS) * len(shared.producer_storage)
    assert not [k for k in keys if k.startswith("stage_blocks") and k.rsplit(".", 1)[1] in PRODUCER_FIELDS]
    loaded = MosaicUNet.from_pretrained(tmp_path / "m")
    assert loaded.memory_report() == shared.memory_report()
    for j, store in enumerate(loaded.producer_storage):
        assert all(stage[j].producers is store for stage in loaded.stage_blocks)
    x, text, added = unet_inputs()
    for t in (900, 500, 100):
        tt = torch.full((2,), t)
        with torch.no_grad():
            assert_close(loaded(x, tt, text, added_cond_kwargs=added).sample,
                         shared(x, tt, text, added_cond_kwargs=added).sample, atol=0, rtol=0)
    half = MosaicUNet.from_pretrained(tmp_path / "m", torch_dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.stage_blocks[1][0].operands("ff1")[1].weight.dtype == torch.bfloat16


def test_format_1_0_folder_still_loads():
    cfg = json.loads((LEGACY / "config.json").read_text())
    assert cfg["format_version"] == "1.0" and "shared_producers" not in cfg
    mosaic = MosaicUNet.from_pretrained(LEGACY, torch_dtype=torch.float32)
    assert mosaic.producer_storage is None and [r[0] for r in mosaic.stage_ranges] == ["early", "middle", "late"]
    want = load_file(str(LEGACY.parent / "unet_format_1_0_outputs.safetensors"))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    added = {"text_embeds": torch.randn(1, 8, generator=g), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]])}
    for t in (900, 500, 100):
        with torch.no_grad():
            got = mosaic(x, torch.full((1,), t), text, added_cond_kwargs=added).sample
        assert_close(got, want[f"t{t}"], atol=1e-5, rtol=1e-5)


def test_prune_shares_by_default_and_copies_on_request(unet):
    assert MosaicUNet.shares_producers
    default = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False)
    assert default.producer_storage is not None and default.config.meta["share_producers"] is True
    owned = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False, share_producers=False)
    assert owned.producer_storage is None and owned.config.meta["share_producers"] is False


def test_share_producers_refuses_kept_sets_that_cannot_share(unet):
    free = prune_stages(unet, None, 0.4, pruner="random", boundaries=(198, 783), stage_sparsities=(0.5, 0.25, 0.5),
                        align=None, progress=False, share_producers=False, seed=3)
    with pytest.raises(ValueError, match="cannot share one storage"):
        MosaicUNet.from_dense(unet, free, share_producers=True)
    assert MosaicUNet.from_dense(unet, free).producer_storage is None  # None: copies where sharing is impossible


def test_constructor_refuses_shared_producers_that_do_not_fit(shared):
    cfg = {k: v for k, v in shared.config.items() if not k.startswith("_")}
    units = [dict(p) for p in cfg.pop("shared_producers")]
    stages = cfg.pop("stages")
    rest = {k: cfg.pop(k) for k in ("dense_reference", "meta")}
    # a unit the stage does not keep, put inside one of its runs
    j, kept = next((j, spec["blocks"][j]["kept_channels"]) for spec in stages for j in range(len(units))
                   if 2 <= len(spec["blocks"][j]["kept_channels"]) < len(units[j]["channels"]))
    outsider = next(u for u in units[j]["channels"] if u not in kept)
    order = [kept[0], outsider, *kept[1:]]
    units[j] = {**units[j], "channels": order + [u for u in units[j]["channels"] if u not in order]}
    with pytest.raises(ValueError, match=f"block {j} does not fit shared_producers\\[{j}\\]"):
        MosaicUNet(cfg, stages, shared_producers=units, **rest)
    with pytest.raises(ValueError, match="one entry per transformer block"):
        MosaicUNet(cfg, stages, shared_producers=units[:-1], **rest)


def test_runs_that_start_inside_the_storage_equal_their_copies(unet):
    """Random nested kept sets (the outer stages keep different random subsets of the middle
    stage's units, not a chain): the late stage's run starts inside the storage, so its q/k/v,
    kv2 and GEGLU rows are read at a nonzero offset (the magnitude fixture's runs all start at 0)."""
    stages = prune_stages(unet, None, 0.4, pruner="random", boundaries=(198, 783), stage_sparsities=(0.5, 0.25, 0.5),
                          align=None, progress=False, share_producers=True, seed=3)
    shared = MosaicUNet.from_dense(unet, stages, share_producers=True)
    copies = MosaicUNet.from_dense(unet, stages, share_producers=False)
    starts = {kind: max(s[j].ranges[kind][0] for s in shared.stage_blocks for j in range(len(s)))
              for kind in ("heads1", "heads2", "channels")}
    assert min(starts.values()) > 0, f"every unit kind needs a run that does not start at 0: {starts}"
    g = torch.Generator().manual_seed(4)
    text = torch.randn(2, 7, TEXT, generator=g)
    for i, (s_blocks, c_blocks) in enumerate(zip(shared.stage_blocks, copies.stage_blocks)):
        for j, (s, c) in enumerate(zip(s_blocks, c_blocks)):
            h = torch.randn(2, 12, c.out1_bias.numel(), generator=g)
            with torch.no_grad():
                assert_close(s(h, encoder_hidden_states=text), c(h, encoder_hidden_states=text), atol=1e-5,
                             rtol=1e-5, msg=lambda m, i=i, j=j, r=s.ranges: f"stage {i} block {j} (ranges {r}): {m}")
    x, text, added = unet_inputs()
    for t in (900, 500, 100):  # one timestep per stage
        tt = torch.full((2,), t)
        with torch.no_grad():
            want = copies(x, tt, text, added_cond_kwargs=added).sample
            assert_close(shared(x, tt, text, added_cond_kwargs=added).sample, want,
                         atol=1e-5 * float(want.abs().max()), rtol=1e-5)

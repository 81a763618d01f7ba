"""MosaicDiT against diffusers' DiTTransformer2DModel and DiTPipeline (fp32, CPU).

Tolerance: ATOL=2e-5, RTOL=1e-5 (fp32; outputs are O(1)). Only the summation order differs from
diffusers: batched adaLN GEMM, fused qkv GEMM.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.core.stages import StageSpec
from tests.runtime.dit_helpers import (
    ATOL,
    NUM_CLASSES,
    RTOL,
    inputs,
    sliced_block,
    tiny_dit,
    two_stage_plan,
    two_stage_specs,
    zeroed_reference,
)


def _run(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


@pytest.mark.parametrize("identical, out_channels", [(True, 8), (False, 8), (True, 4)],
                         ids=["shared-emb", "per-block-emb", "shared-emb-no-sigma"])
def test_unpruned_mosaic_matches_dense(identical, out_channels):
    dense = tiny_dit(out_channels=out_channels, identical_embedders=identical)
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    x, labels = inputs(batch=3)  # labels include the null class NUM_CLASSES
    assert NUM_CLASSES in labels.tolist()
    for t in (0, 1, 250, 999):
        want = _run(dense, x, torch.full((3,), t), labels)
        got = _run(mosaic, x, torch.full((3,), t), labels)
        assert got.shape == (3, out_channels, 8, 8)
        assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"t={t}: {m}")


def test_timestep_forms_and_return_tuple():
    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    x, labels = inputs(batch=2)
    want = _run(dense, x, torch.tensor([321, 321]), labels)
    forms = (321, 321.0, torch.tensor(321), torch.tensor([321]), torch.tensor([321.0, 321.0], dtype=torch.float64))
    for t in forms:
        got = _run(mosaic, x, t, labels)
        assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"timestep {t!r}: {m}")
    # A float timestep between integers (e.g. Karras-sigma schedulers) is embedded as given.
    assert_close(_run(mosaic, x, 250.5, labels), _run(dense, x, torch.tensor([250.5, 250.5]), labels),
                 atol=ATOL, rtol=RTOL, msg=lambda m: f"t=250.5: {m}")
    # Two different timesteps in one stage are fine and embedded per sample.
    t_mixed = torch.tensor([100, 900])
    assert_close(_run(mosaic, x, t_mixed, labels), _run(dense, x, t_mixed, labels), atol=ATOL, rtol=RTOL,
                 msg=lambda m: f"per-sample timesteps: {m}")
    with torch.no_grad():
        out = mosaic(x, timestep=321, class_labels=labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert_close(out[0], want, atol=ATOL, rtol=RTOL)


def _two_stage(dense, **kw):
    return MosaicDiT.from_dense(dense, two_stage_specs(dense), source="tiny-random-dit",
                     meta={"method": "manual-slice", "boundaries": [400]}, **kw)


def test_stage_switching_runs_the_right_stage(dense):
    mosaic = _two_stage(dense)
    plan = two_stage_plan()
    refs = {name: zeroed_reference(dense, *hc) for name, (_, _, hc) in plan.items()}
    seen = []
    mosaic.on_stage_change = lambda i, name: seen.append(name)
    x, labels = inputs(batch=2)
    for t, name in [(0, "late"), (399, "late"), (400, "early"), (999, "early"), (399.5, "early")]:
        if t == 399.5:  # [0, 400) is "late": 399.5 < 400
            name = "late"
        assert mosaic.stages[mosaic.stage_for(t)].name == name
        got = _run(mosaic, x, t, labels)
        want = _run(refs[name], x, torch.full((2,), float(t)), labels)
        other = _run(refs["early" if name == "late" else "late"], x, torch.full((2,), float(t)), labels)
        assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"t={t} expected stage {name}: {m}")
        assert (got - other).abs().max() > 1e-3, "the two stages must give different outputs"
    # The hook fires on changes only: late, early, late.
    assert seen == ["late", "early", "late"]


def test_mixed_stage_batch_equals_its_rows_one_by_one():
    """A server batching requests at different steps: each stage runs on its rows, in row order."""
    dense = tiny_dit()
    mosaic = _two_stage(dense)
    x, labels = inputs(batch=4)
    t = torch.tensor([399, 400, 10, 999])  # late, early, late, early
    got = _run(mosaic, x, t, labels)
    want = torch.cat([_run(mosaic, x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(4)])
    assert_close(got, want, atol=ATOL, rtol=RTOL)
    # not a stage's output for every row: the rows really took different stages
    assert (got[0] - _run(mosaic, x, torch.full((4,), 400), labels)[0]).abs().max() > 1e-3
    (late, late_rows), (early, early_rows) = mosaic.stage_rows(t, 4)
    assert mosaic.stage_names[late] == "late" and late_rows.tolist() == [0, 2] and early_rows.tolist() == [1, 3]
    with pytest.raises(ValueError, match="span stages"):
        mosaic.stage_for(t)
    assert mosaic.stage_for(torch.tensor([400, 999])) == early  # one semantics: all rows in one stage


def test_forward_input_errors():
    dense = tiny_dit()
    mosaic = _two_stage(dense)
    x, labels = inputs(batch=2)
    with pytest.raises(ValueError, match="outside every stage"):
        _run(mosaic, x, 1000, labels)
    with pytest.raises(ValueError, match="timestep must be"):
        _run(mosaic, x, torch.tensor([1, 2, 3]), labels)
    with pytest.raises(ValueError, match="class_labels"):
        _run(mosaic, x, 10, None)
    with pytest.raises(ValueError, match="timestep"):
        _run(mosaic, x, None, labels)
    with pytest.raises(NotImplementedError, match="cross_attention_kwargs"):
        mosaic(x, timestep=10, class_labels=labels, cross_attention_kwargs={"scale": 1.0})


def test_stage_validation():
    dense = tiny_dit()
    specs = two_stage_specs(dense)
    late, early = specs
    with pytest.raises(ValueError, match="leave a gap"):
        MosaicDiT.from_dense(dense, [late, StageSpec("early", 401, 1000, 0.5, early.blocks)])
    with pytest.raises(ValueError, match="overlap"):
        MosaicDiT.from_dense(dense, [late, StageSpec("early", 300, 1000, 0.5, early.blocks)])
    with pytest.raises(ValueError, match="expected 2 blocks, got 1"):
        MosaicDiT.from_dense(dense, [StageSpec("all", 0, 1000, 0.5, late.blocks[:1])])
    with pytest.raises(ValueError, match="t_start must be < t_end"):
        MosaicDiT.from_dense(dense, [StageSpec("all", 10, 10, 0.5, late.blocks)])
    with pytest.raises(ValueError, match="at least one stage"):
        MosaicDiT.from_dense(dense, [])
    with pytest.raises(TypeError, match="JSON"):
        MosaicDiT.from_dense(dense, specs, meta={"bad": object()})


def test_memory_report_counts(dense):
    mosaic = _two_stage(dense)
    rep = mosaic.memory_report()
    blocks = dense.transformer_blocks
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    n_emb = 1 if torch.equal(blocks[0].norm1.emb.class_embedder.embedding_table.weight,
                             blocks[1].norm1.emb.class_embedder.embedding_table.weight) else len(blocks)
    shared = (numel(dense.pos_embed) + n_emb * numel(blocks[0].norm1.emb)
              + sum(numel(b.norm1.linear) for b in blocks) + numel(dense.proj_out_1) + numel(dense.proj_out_2))
    assert rep["shared_params"] == shared
    for spec in two_stage_specs(dense):
        want = sum(t.numel() for w in spec.blocks for k, t in w.tensors().items() if not k.startswith("kept_"))
        assert rep["stages"][spec.name]["params"] == want
        assert rep["stages"][spec.name]["bytes"] == 4 * want
    assert rep["dense_params"] == numel(dense) and rep["dense_bytes"] == 4 * numel(dense)
    assert rep["mosaic_params"] == shared + sum(s["params"] for s in rep["stages"].values())
    assert rep["ratio"] == pytest.approx(rep["mosaic_bytes"] / rep["dense_bytes"])
    # The unpruned engine with a shared embedder is smaller than dense by the dropped embedders.
    unpruned = MosaicDiT.from_dense_unpruned(dense).memory_report()
    assert unpruned["mosaic_params"] == numel(dense) - (len(blocks) - n_emb) * numel(blocks[0].norm1.emb)
    # Element size follows the mosaic's dtype.
    half = MosaicDiT.from_dense_unpruned(dense).to(torch.float16).memory_report()
    assert half["mosaic_bytes"] == 2 * unpruned["mosaic_params"]
    assert half["dense_bytes_same_dtype"] == 2 * numel(dense)


def test_to_dtype_and_repr():
    dense = tiny_dit()
    mosaic = _two_stage(dense).to(torch.float16)
    assert mosaic.dtype == torch.float16 and mosaic.device.type == "cpu"
    assert mosaic.stage_blocks[0][0].qkv_weight.dtype == torch.float16
    x, labels = inputs(batch=2)
    ref = zeroed_reference(dense, *two_stage_plan()["early"][2])
    got = _run(mosaic, x.half(), 700, labels)
    assert got.dtype == torch.float16
    # fp16 weights and activations against the fp32 reference: fp16 rounding only.
    assert_close(got.float(), _run(ref, x, torch.tensor([700, 700]), labels), atol=3e-2, rtol=3e-2,
                 msg=lambda m: f"float16 mosaic vs float32 reference: {m}")
    text = repr(mosaic)
    assert "late[0,400)" in text and "early[400,1000)" in text and "CompactDiTBlock" in text
    # the mosaic's diffusers config repeats the dense architecture (what DiTPipeline and sample read)
    from mosaicdiff.families.dit.adapter import DIT_CONFIG_KEYS
    assert {k: mosaic.config[k] for k in DIT_CONFIG_KEYS} == {k: dense.config[k] for k in DIT_CONFIG_KEYS}
    assert mosaic.meta["source"] == "tiny-random-dit"


def test_dense_blocks_are_not_kept():
    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    names = [n for n, _ in mosaic.named_modules()]
    assert not any("transformer_blocks" in n for n in names)
    assert all(not p.requires_grad for p in mosaic.parameters())
    # Independent of the dense model: changing the dense weights does not change the mosaic.
    x, labels = inputs(batch=2)
    before = _run(mosaic, x, 10, labels)
    with torch.no_grad():
        for p in dense.parameters():
            p.zero_()
    assert torch.equal(_run(mosaic, x, 10, labels), before)


def test_kernel_config_selection_on_stage_change(monkeypatch, caplog):
    from mosaic_kernels import configs

    calls = []
    monkeypatch.setattr(configs, "select_configs_for_shapes", lambda items, device=None: calls.append(list(items)))
    mosaic = _two_stage(tiny_dit())
    x, labels = inputs(batch=2)
    for t in (900, 800, 100):
        _run(mosaic, x, t, labels)
    assert len(calls) == 2  # early, then late
    late_block0_channels = len(two_stage_plan()["late"][2][1][0])
    assert ("linear_gelu", (2 * 16, late_block0_channels, 32), torch.float32) in calls[1]
    assert ("ln_modulate", (2, 16, 32), torch.float32) in calls[1]

    def boom(items, device=None):
        raise RuntimeError("no table")

    monkeypatch.setattr(configs, "select_configs_for_shapes", boom)
    with caplog.at_level(logging.WARNING, logger="mosaicdiff.families.dit.model"):
        out = _run(mosaic, x, 900, labels)  # still runs
    assert out.shape == (2, 8, 8, 8) and "kernel config selection failed" in caplog.text


# ------------------------------------------------------------------ DiTPipeline


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
    ).eval()


def _pipe(transformer, vae, scheduler=None):
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=3):
    return pipe(class_labels=[1, 7], guidance_scale=4.0, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("out_channels", [8, 4], ids=["learned-sigma", "eps-only"])
def test_dit_pipeline_with_mosaic_matches_dense(out_channels):
    dense = tiny_dit(out_channels=out_channels, num_classes=1000)  # the pipeline's null class is 1000
    vae = _tiny_vae()
    want = _sample(_pipe(dense, vae))
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    pipe = _pipe(mosaic, vae)
    pipe.to("cpu")
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    got = _sample(pipe)
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"DiTPipeline dense vs mosaic: {m}")


@pytest.mark.parametrize("scheduler_name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_other_schedulers_match_dense(scheduler_name):
    """Multistep (keeps past outputs) and float-timestep schedulers work unchanged."""
    import diffusers

    make = lambda: getattr(diffusers, scheduler_name)(num_train_timesteps=1000)  # noqa: E731
    dense = tiny_dit(num_classes=1000)
    vae = _tiny_vae()
    want = _sample(_pipe(dense, vae, make()))
    mosaic = MosaicDiT.from_dense(dense, [StageSpec("all", 0, 1000, 0.0, [
        sliced_block(b, list(range(4)), list(range(128))) for b in dense.transformer_blocks])])
    got = _sample(_pipe(mosaic, vae, make()))
    assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{scheduler_name}: {m}")


def test_dit_pipeline_switches_stages():
    dense = tiny_dit(num_classes=1000)
    mosaic = _two_stage(dense)
    seen = []
    mosaic.on_stage_change = lambda i, name: seen.append(name)
    pipe = _pipe(mosaic, _tiny_vae())
    images = _sample(pipe, steps=3)  # DDIM "leading" timesteps 666, 333, 0
    assert torch.isfinite(images).all()
    assert seen == ["early", "late"]


def test_rejects_unsupported_block_math():
    from diffusers import DiTTransformer2DModel

    affine = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4,
                                   num_embeds_ada_norm=10, norm_num_groups=4, norm_elementwise_affine=True)
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\[0\] uses affine norm3"):
        MosaicDiT.from_dense_unpruned(affine)

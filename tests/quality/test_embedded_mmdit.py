"""The embedded digits MMDiT (Flux.1 layout, rectified flow): loads offline with its config, packs
pixels as FluxPipeline packs latents, predicts held-out velocities, its 8-step Euler samples are the
requested digits, and the same checks reject an untrained model of the same config."""

from __future__ import annotations

import json

import pytest
import torch

from mosaicdiff.eval import quality
from mosaicdiff.zoo import (DIGITS_MMDIT_DIR, digits_mmdit_scheduler, load_digits_label_tokens, load_digits_mmdit,
                            load_digits_mmdit_conditioning, train_mmdit)
from mosaicdiff.zoo.data import NUM_CLASSES
from mosaicdiff.zoo.training import digits_split

RECORDED = json.loads((DIGITS_MMDIT_DIR / "training.json").read_text())
# One fixed draw of (s, eps) on 64 held-out images scored 0.113-0.122 over seeds 1-5 against the
# recorded 4-draw mean over all 180 (0.122); an untrained model scores about 2.1, predicting 0 about 1.6.
VELOCITY_MSE_BOUND = RECORDED["held_out_velocity_mse"] + 0.03
# 20 samples of 8 Euler steps; chance is 0.1. Measured over noise seeds 0-3: 0.95-1.0 trained,
# 0.0-0.1 untrained.
ACCURACY_BOUND = 0.8


def _held_out_velocity_mse(model, conditioning) -> float:
    images, labels = digits_split()[2]
    return train_mmdit.held_out_loss(model, conditioning, images[:64], labels[:64], repeats=1)


def _sample_accuracy(model, conditioning_of) -> float:
    labels = torch.arange(20) % NUM_CLASSES
    images = train_mmdit.sample(model, conditioning_of(labels), len(labels), num_inference_steps=8,
                                generator=torch.Generator().manual_seed(0))
    return quality.class_accuracy(images, labels)


@pytest.fixture(scope="module")
def shipped():
    return load_digits_mmdit(), load_digits_mmdit_conditioning


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return train_mmdit.build_model().eval(), train_mmdit.LabelConditioning()


def test_loads_offline_with_its_config(monkeypatch, shipped):
    """A FluxTransformer2DModel with double- and single-stream blocks, RoPE over the head width, no
    guidance embedding; conditioning shaped as its forward takes it; bad labels named."""
    from diffusers import FluxTransformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_digits_mmdit(torch_dtype=torch.float32)
    assert isinstance(model, FluxTransformer2DModel) and not model.training
    cfg = model.config
    for key, value in train_mmdit.MODEL_CONFIG.items():
        assert tuple(cfg[key]) == value if isinstance(value, tuple) else cfg[key] == value, key
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 4
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim and not cfg.guidance_embeds
    assert RECORDED["model_config"] == json.loads(json.dumps(train_mmdit.MODEL_CONFIG))
    cond = load_digits_mmdit_conditioning([3, 7])
    assert cond["encoder_hidden_states"].shape == (2, 4, cfg.joint_attention_dim)
    assert cond["pooled_projections"].shape == (2, cfg.pooled_projection_dim)
    assert torch.equal(cond["txt_ids"], torch.zeros(4, 3)) and cond["img_ids"].shape == (64, 3)
    table = load_digits_label_tokens(model="mmdit")
    assert table.shape == (NUM_CLASSES + 1, 4, 64)
    torch.testing.assert_close(cond["encoder_hidden_states"], table[[3, 7]], rtol=0, atol=1e-6)
    assert not torch.allclose(table, load_digits_label_tokens(model="pixart"))
    with pytest.raises(ValueError, match=r"labels must be digits in 0\.\.9"):
        load_digits_mmdit_conditioning([2, NUM_CLASSES])


def test_packs_like_flux_pipeline():
    """`pack` / `image_ids` against FluxPipeline's own static methods (the oracle), `unpack` inverts."""
    from diffusers import FluxPipeline

    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(train_mmdit.pack(x), FluxPipeline._pack_latents(x, 3, 1, 16, 16), rtol=0, atol=0)
    torch.testing.assert_close(train_mmdit.unpack(train_mmdit.pack(x)), x, rtol=0, atol=0)
    torch.testing.assert_close(train_mmdit.image_ids(), FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu",
                                                                                              torch.float32))
    assert torch.equal(train_mmdit.pack(x)[0, 9], torch.stack([x[0, 0, 2, 2], x[0, 0, 2, 3], x[0, 0, 3, 2],
                                                               x[0, 0, 3, 3]]))  # token (1, 1): rows 2-3, cols 2-3


def test_held_out_velocity_mse_near_the_recorded(shipped, untrained):
    """Velocity MSE on 64 held-out digits (one fixed draw) under the bound from training.json; an
    untrained model of the same config is far above it."""
    assert RECORDED["held_out_velocity_mse"] < 0.2  # its first checkpoint (step 500) scored 0.20
    loss = _held_out_velocity_mse(*shipped)
    assert loss < VELOCITY_MSE_BOUND, (loss, RECORDED["held_out_velocity_mse"])
    assert _held_out_velocity_mse(*untrained) > VELOCITY_MSE_BOUND


def test_euler_samples_are_the_requested_digits(shipped, untrained):
    """20 samples (two per digit), 8 unshifted Euler steps, no guidance: the
    classifier reads most as their digit; an untrained model's are near chance. The demo samples with
    `digits_mmdit_scheduler`, SD3's shift 3."""
    assert _sample_accuracy(*shipped) >= ACCURACY_BOUND
    with torch.no_grad():  # (the untrained conditioning is a module with gradients)
        assert _sample_accuracy(*untrained) < ACCURACY_BOUND
    scheduler = digits_mmdit_scheduler()
    assert (scheduler.config.num_train_timesteps, scheduler.config.shift) == (1000, 3.0)  # SD3's shift


def test_trainer_resumes_and_records_phases(tmp_path, monkeypatch):
    """A run killed in its third step, then resumed to step 3: the killed phase (reached step 2, its
    last checkpoint) is kept in training.json beside the resumed one, and the export loads."""
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(train_mmdit, "held_out_loss", lambda *args, **kwargs: 0.5)  # (seconds; not under test)
    real_step, calls = train_mmdit.optimizer_step, []

    def killed_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_step(*args, **kwargs)

    args = ["--out", str(tmp_path), "--batch-size", "4", "--save-every", "1", "--warmup-steps", "0", "--steps", "3"]
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train_mmdit, "optimizer_step", killed_in_step_3)
        train_mmdit.main(args)
    assert not (tmp_path / "training.json").exists()
    train_mmdit.main([*args, "--resume"])
    info = json.loads((tmp_path / "training.json").read_text())
    assert [(p["from_step"], p["reached_step"], p["command"]) for p in info["phases"]] == [
        (0, 2, "--out DIR --batch-size 4 --save-every 1 --warmup-steps 0 --steps 3"),
        (2, 3, "--out DIR --batch-size 4 --save-every 1 --warmup-steps 0 --steps 3 --resume")]
    assert [h["step"] for h in info["held_out_velocity_mse_history"]] == [1, 2, 3] and info["checkpoint_step"] == 3
    assert info["label_dropout"] == 0.0
    assert FluxTransformer2DModel.from_pretrained(str(tmp_path)).config.num_single_layers == 4


@pytest.mark.parametrize("argv, message", [(["--stop-after", "0"], "--stop-after must be >= 1, got 0"),
                                           (["--steps", "3", "--warmup-steps", "5"], "--warmup-steps must be in")])
def test_trainer_names_a_bad_argument(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train_mmdit.main(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_demo_digits_mmdit_end_to_end(tmp_path, capsys):
    """`demo --model digits-mmdit` (reduced: 4 samples, 6 Euler steps at shift 3): the Flux-layout
    mosaic in three stages (the first step, t = 1000, in the early one), the middle pruned least,
    uniform OBS beside it, QF3 on the flow closed form; a guidance scale other than 1 is refused."""
    from mosaicdiff.__main__ import main
    from mosaicdiff.app.subjects import DigitsMMDiT

    out = tmp_path / "mmdit"
    code = main(["demo", "--model", "digits-mmdit", "--num-samples", "4", "--steps", "6", "--samples-per-stage",
                 "4", "--sparsity", "0.3", "--methods", "mosaic,uniform", "--out", str(out), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "mosaic - uniform:" in table and "QF3: Pearson" in table, table
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report["settings"]["model"] == "digits-mmdit"
    assert "flow matching" in report["settings"]["sampler"] and report["settings"]["guidance_scale"] == 1.0
    mosaic = report["methods"]["mosaic"]
    stages = mosaic["stages"]
    assert list(stages) == ["early", "middle", "late"] and stages["early"]["t_end"] == 1001, stages
    sp = {k: v["sparsity"] for k, v in stages.items()}
    assert sp["middle"] < min(sp["early"], sp["late"]), sp
    assert 0 < mosaic["psnr_to_dense"] < 100 and 0 < mosaic["memory"]["ratio"] < 3
    assert report["stage_curve"]["pearson_mse"] > 0.95, report["stage_curve"]
    with pytest.raises(ValueError, match="guidance_scale must be 1.0"):
        DigitsMMDiT().sample(load_digits_mmdit(), torch.arange(2), torch.zeros(2, 1, 16, 16), steps=2, guidance_scale=2.0,
                       progress=False)

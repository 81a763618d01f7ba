"""The embedded digits U-Net: loads offline, denoises held-out digits, and its samples are the
digits its label tokens ask for."""

from __future__ import annotations

import json

import torch

from mosaicdiff.eval import quality
from mosaicdiff.zoo import DIGITS_UNET_DIR, digits_unet_scheduler, load_digits_label_tokens, load_digits_unet
from mosaicdiff.zoo.data import NUM_CLASSES, load_digits_tensors, train_test_split
from mosaicdiff.zoo.train_unet import LabelTokens, held_out_loss


def test_loads_offline_and_denoises(monkeypatch):
    """Held-out epsilon MSE (one fixed draw of t and noise) near the training.json value (0.0266,
    4 draws); a trivial predictor scores about 1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = load_digits_unet()
    tokens = LabelTokens()
    tokens.table.data.copy_(load_digits_label_tokens())
    images, labels = load_digits_tensors()
    _, test_idx = train_test_split(len(images))
    loss = held_out_loss(unet, tokens, images[test_idx], labels[test_idx], repeats=1)
    recorded = json.loads((DIGITS_UNET_DIR / "training.json").read_text())["held_out_eps_mse"]
    assert loss < 0.06 and abs(loss - recorded) < 0.02, (loss, recorded)
    cfg = unet.config
    assert (cfg.in_channels, cfg.sample_size, cfg.cross_attention_dim) == (1, 16, 64)
    assert tuple(load_digits_label_tokens().shape) == (NUM_CLASSES + 1, 4, 64)


def test_samples_are_the_requested_digits():
    """20 samples (two per digit), DDIM 20 steps, guidance 1.5: the shipped classifier reads at
    least 16 as their requested digit (measured: 200 samples at 50 steps, 0.99)."""
    from mosaicdiff.core.text_sampling import sample_with_text

    unet, table = load_digits_unet(), load_digits_label_tokens()
    labels = torch.arange(20) % NUM_CLASSES
    images = sample_with_text(unet, table[labels], table[NUM_CLASSES:], scheduler=digits_unet_scheduler(),
                              num_inference_steps=20, guidance_scale=1.5,
                              generator=torch.Generator().manual_seed(0), progress=False)
    acc = quality.class_accuracy(images, labels)
    assert acc >= 0.8, f"class accuracy {acc}"

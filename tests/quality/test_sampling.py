"""`mosaicdiff.core.sampling.sample` against diffusers' own DiT pipeline, and its options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mosaicdiff.core.sampling import default_scheduler, make_noise, sample


def tiny_dit(out_channels: int = 1, num_classes: int = 1000, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                 out_channels=out_channels, num_layers=2, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero").eval()


class IdentityVAE(nn.Module):
    """Stands in for the VAE so DiTPipeline returns its latents: decode(x) = x, scaling 1."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)

    @property
    def device(self):
        return torch.device("cpu")

    def decode(self, x):
        return SimpleNamespace(sample=x)


def pipeline_samples(model, labels, steps, guidance, seed):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=model, vae=IdentityVAE(), scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out * 2 - 1  # the pipeline maps [-1, 1] to [0, 1]


@pytest.mark.parametrize("out_channels", [1, 2], ids=["eps", "learned-sigma"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_diffusers_dit_pipeline(out_channels, guidance):
    """Same model, scheduler and noise seed as DiTPipeline (null class 1000): same images."""
    model = tiny_dit(out_channels)
    labels = torch.tensor([1, 7, 999])
    want = pipeline_samples(model, labels, 6, guidance, seed=3)
    got = sample(model, labels, num_inference_steps=6, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0,
                               msg=lambda m: f"sample vs DiTPipeline (g={guidance}): {m}")


def test_guidance_changes_result_and_noise_is_fixed():
    model = tiny_dit(num_classes=10)
    labels = torch.arange(4)
    noise = make_noise(model, 4, seed=0)
    a = sample(model, labels, num_inference_steps=4, guidance_scale=1.0, noise=noise, progress=False)
    b = sample(model, labels, num_inference_steps=4, guidance_scale=3.0, noise=noise, progress=False)
    c = sample(model, labels, num_inference_steps=4, guidance_scale=3.0, noise=make_noise(model, 4, seed=0),
               progress=False)
    assert (a - b).abs().max() > 1e-3, "guidance scale had no effect"
    torch.testing.assert_close(b, c, atol=0, rtol=0, msg=lambda m: f"same seed, different images: {m}")
    assert a.min() >= -1 and a.max() <= 1, f"images outside [-1, 1]: [{a.min()}, {a.max()}]"


def test_trajectory_and_batching():
    model = tiny_dit(num_classes=10)
    labels = torch.tensor([0, 1, 2, 3, 4])
    noise = make_noise(model, 5, seed=1)
    full, traj = sample(model, labels, num_inference_steps=5, guidance_scale=2.0, noise=noise,
                        return_trajectory=True, progress=False)
    chunked = sample(model, labels, num_inference_steps=5, guidance_scale=2.0, noise=noise, batch_size=2,
                     progress=False)
    # Different batch shapes change the float32 reduction order only (measured < 4e-5 over 5 steps).
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0, msg=lambda m: f"batch_size=2 vs all: {m}")
    assert traj.timesteps.tolist() == [800, 600, 400, 200, 0], traj.timesteps.tolist()
    assert len(traj.xs) == 5 and traj.xs[0].shape == (5, 1, 8, 8)
    torch.testing.assert_close(traj.xs[0], noise, atol=0, rtol=0, msg=lambda m: f"x_T is not the noise: {m}")


def test_mosaic_unpruned_matches_dense():
    """A MosaicDiT holding the dense blocks (no pruning) samples the same images through `sample`."""
    from mosaicdiff.families.dit.model import MosaicDiT

    model = tiny_dit(num_classes=10)
    mosaic = MosaicDiT.from_dense_unpruned(model)
    labels = torch.tensor([3, 5, 9])
    noise = make_noise(model, 3, seed=2)
    dense = sample(model, labels, num_inference_steps=5, guidance_scale=2.0, noise=noise, progress=False)
    got = sample(mosaic, labels, num_inference_steps=5, guidance_scale=2.0, noise=noise, progress=False)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=0, msg=lambda m: f"mosaic vs dense: {m}")


def test_sample_rejects_bad_input():
    model = tiny_dit(num_classes=10)
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        sample(model, [10], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="noise must be"):
        sample(model, [1, 2], noise=torch.zeros(2, 1, 4, 4), num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match="integers"):
        sample(model, torch.tensor([1.0]), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(model, [1], num_inference_steps=0, progress=False)

"""`sample_with_text`: the CFG loop over text states, against a loop written out by hand."""

from __future__ import annotations

import pytest
import torch

from mosaicdiff.core.text_sampling import sample_with_text


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=8).eval()


def _scheduler():
    from mosaicdiff.zoo import digits_unet_scheduler

    return digits_unet_scheduler()


@torch.no_grad()
def _by_hand(unet, prompt, negative, noise, steps, g):
    """DDIM with CFG written out: eps = eps_u + g (eps_c - eps_u) from one doubled batch."""
    sched = _scheduler()
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([prompt, negative])).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + g * (e_c - e_u), t, x).prev_sample
    return x.clamp(-1, 1)


def test_matches_the_loop_written_out(unet):
    g = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(3, 5, 12, generator=g), torch.randn(3, 5, 12, generator=g)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    got = sample_with_text(unet, prompt, negative, scheduler=_scheduler(), num_inference_steps=4, guidance_scale=2.5,
                           noise=noise, progress=False)
    want = _by_hand(unet, prompt, negative, noise, 4, 2.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # one negative row broadcasts to every image; batching does not change the images
    one = sample_with_text(unet, prompt, negative[:1], scheduler=_scheduler(), num_inference_steps=4,
                           guidance_scale=2.5, noise=noise, progress=False, batch_size=2)
    torch.testing.assert_close(one, _by_hand(unet, prompt, negative[:1].expand(3, -1, -1), noise, 4, 2.5),
                               rtol=1e-4, atol=1e-5)


def test_guidance_one_is_the_conditional_model_alone(unet):
    g = torch.Generator().manual_seed(2)
    prompt, noise = torch.randn(2, 5, 12, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    got, traj = sample_with_text(unet, prompt, scheduler=_scheduler(), num_inference_steps=3, guidance_scale=1.0,
                                 noise=noise, progress=False, return_trajectory=True)
    sched = _scheduler()
    sched.set_timesteps(3)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, encoder_hidden_states=prompt).sample, t, x).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert len(traj.xs) == 3 and traj.timesteps.tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(traj.xs[0], noise)


@pytest.mark.parametrize("prompt,negative,match", [
    (torch.randn(2, 12), None, "prompt_embeds must be a float"),
    (torch.randn(2, 5, 12), torch.randn(3, 5, 12), "negative_prompt_embeds has 3 rows"),
    (torch.randn(2, 5, 12), torch.randn(1, 4, 12), "negative_prompt_embeds rows"),
    (torch.full((2, 5, 12), float("nan")), None, "NaN"),
])
def test_bad_states_are_one_clear_error(unet, prompt, negative, match):
    with pytest.raises(ValueError, match=match):
        sample_with_text(unet, prompt, negative, scheduler=_scheduler(), num_inference_steps=2, progress=False)

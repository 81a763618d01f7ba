"""The released Flux transformers' configs (diffusers ``FluxTransformer2DModel`` kwargs), for runs and
measurements without the hub: plain dicts, so importing costs nothing."""

#: black-forest-labs/FLUX.1-dev: 19 double-stream and 38 single-stream blocks of 24 heads x 128 (width
#: 3072, MLP 12288), T5-XXL text (4096 channels), CLIP pooled (768), 2x2-packed 16-channel latents,
#: guidance-distilled (guidance embedding), RoPE axes 16 + 56 + 56.
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
#: black-forest-labs/FLUX.1-schnell: the same transformer without the guidance embedding (timestep-distilled).
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}
#: FLUX.1-dev's (and schnell's) scheduler config: ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting,
#: ``mu`` linear in the latent tokens from 0.5 at 256 to 1.15 at 4096 (``FluxPipeline``'s ``calculate_shift``).
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

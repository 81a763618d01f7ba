"""The released SD3 / SD3.5 transformers' configs (diffusers ``SD3Transformer2DModel`` kwargs), for runs and
measurements without the hub: plain dicts, so importing costs nothing."""

#: stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 heads x 64 (width 2432), q/k RMSNorm, CLIP-L/G +
#: T5-XXL text (4096 channels, 333 tokens), pooled CLIP 2048, 128 x 128 latents of 16 channels (1024 px).
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm")
#: stabilityai/stable-diffusion-3.5-medium (MMDiT-X): 24 blocks of 24 heads x 64 (width 1536), q/k RMSNorm,
#: a second self-attention in blocks 0..12, positions for up to 384 x 384 latent patches.
SD35_MEDIUM = dict(SD35_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))
#: stabilityai/stable-diffusion-3-medium-diffusers: 24 blocks of 24 heads x 64, no q/k norm, no dual attention.
SD3_MEDIUM = dict(SD35_MEDIUM, pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)

"""The released PixArt transformers' configs (diffusers ``PixArtTransformer2DModel`` kwargs), for runs and
measurements without the hub: plain dicts, so importing costs nothing."""

#: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: 28 blocks of 16 heads x 72 (width 1152), T5-XXL text (4096
#: channels, 300 tokens), 128 x 128 latents (1024 px), learned sigma, no micro-conditions.
PIXART_SIGMA_1024 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                         cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                         norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                         use_additional_conditions=False, caption_channels=4096)
#: PixArt-alpha/PixArt-XL-2-1024-MS: the same transformer with resolution / aspect-ratio micro-conditions
#: (120 text tokens).
PIXART_ALPHA_1024 = {**PIXART_SIGMA_1024, "interpolation_scale": None, "use_additional_conditions": True}

"""The PixArt configs of the GPU suite's pixart stage (suite_pixart.py): the released PixArt-Sigma
1024 px transformer (from the family, `mosaicdiff.families.pixart.configs`) and a tiny one in
diffusers' test layout for the CPU dry run."""

from mosaicdiff.families.pixart.configs import PIXART_SIGMA_1024

__all__ = ["PIXART_SIGMA_1024", "PIXART_SIGMA_TEXT_TOKENS", "PIXART_TINY", "PIXART_TINY_TEXT_TOKENS"]

#: The text states PixArt-Sigma's pipeline passes: 300 T5 tokens (max_sequence_length).
PIXART_SIGMA_TEXT_TOKENS = 300
#: A tiny config in diffusers' PixArt test layout (2 blocks, 3 heads of 8) for the CPU dry run.
PIXART_TINY = dict(sample_size=8, num_layers=2, num_attention_heads=3, attention_head_dim=8, in_channels=4,
                   out_channels=8, patch_size=2, cross_attention_dim=24, caption_channels=32, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
PIXART_TINY_TEXT_TOKENS = 8

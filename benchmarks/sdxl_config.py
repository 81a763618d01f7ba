"""The SDXL base U-Net configs: the real one for the GPU suite's sdxl stage (suite_sdxl.py) and
scripts/sdxl_memory.py, and diffusers' tiny test one for the suite's CPU dry run. Here, not in
scripts/, because benchmarks/ never imports scripts/; plain dicts, so importing costs nothing."""

#: ``UNet2DConditionModel`` kwargs of stabilityai/stable-diffusion-xl-base-1.0's U-Net.
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True)
#: diffusers' tiny SDXL test U-Net (its pipeline tests' layout) for the CPU dry run, at 16 x 16 latents.
SDXL_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), cross_attention_dim=64, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=32,
                 use_linear_projection=True)

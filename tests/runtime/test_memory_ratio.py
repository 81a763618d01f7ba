"""memory_report at DiT-XL/2 size: a shared-producer mosaic stays within 1.25x the dense model."""

from __future__ import annotations

import gc

import pytest
import torch

from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.api import prune_stages

#: DiT-XL/2 at 256 px (facebook/DiT-XL-2-256), random weights.
XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


@pytest.fixture(scope="module")
def dit_xl():
    """bf16 (half the memory of fp32; ratios are per element size) with the identical per-block
    embedders of the converted checkpoint."""
    from diffusers import DiTTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = DiTTransformer2DModel(**XL).eval()
    finally:
        torch.set_default_dtype(previous)
    ref = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(ref)
    yield model
    del model
    gc.collect()


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_dit_xl_mosaic_is_at_most_1_25x_the_dense_model(dit_xl, target):
    stages = prune_stages(dit_xl, None, target, method="mosaic", pruner="magnitude", progress=False)
    shared = MosaicDiT.from_dense(dit_xl, stages, share_producers=True)
    report = shared.memory_report()
    del shared
    copies = MosaicDiT.from_dense(dit_xl, stages, share_producers=False).memory_report()
    gc.collect()
    dense_params = sum(p.numel() for p in dit_xl.parameters())
    assert report["dense_params"] == dense_params
    embedder = sum(p.numel() for p in dit_xl.transformer_blocks[0].norm1.emb.parameters())
    assert report["dense_params_dedup"] == dense_params - 27 * embedder
    assert report["ratio"] <= 1.25, report
    assert report["ratio"] < copies["ratio"]
    # the saving is exactly the producer rows the stages no longer copy: the union of the kept
    # units is stored once instead of each stage's units once per stage
    C = 1152
    saved = 0
    for j in range(28):
        heads = [set(s.blocks[j].kept_heads.tolist()) for s in stages]
        channels = [set(s.blocks[j].kept_channels.tolist()) for s in stages]
        per_stage = sum(3 * 72 * len(h) for h in heads) + sum(len(c) for c in channels)
        union = 3 * 72 * len(set().union(*heads)) + len(set().union(*channels))
        saved += (per_stage - union) * (C + 1)  # rows of weight + bias
    assert copies["mosaic_params"] - report["mosaic_params"] == saved
    print(f"target {target}: ratio {report['ratio']:.3f} (copies {copies['ratio']:.3f}), "
          f"dedup {report['ratio_dedup']:.3f} (copies {copies['ratio_dedup']:.3f})")

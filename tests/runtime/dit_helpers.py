"""Helpers of the runtime tests: tiny random diffusers DiTs and hand-sliced stages.

Slicing heads / channels without compensation must equal the dense model with the dropped
heads' and channels' consumer columns zeroed (`zeroed_reference`): the non-tautological
reference the stage tests compare against.
"""

from __future__ import annotations

import copy

import torch

from mosaicdiff.families.dit.weights import CompactBlockWeights
from mosaicdiff.core.stages import StageSpec

#: fp32 tolerance of mosaic-vs-diffusers comparisons: same math, different summation order
#: (batched adaLN GEMM, fused qkv GEMM, fp32 reference kernels).
ATOL = 2e-5
RTOL = 1e-5

NUM_CLASSES = 10  # null (CFG) class id = NUM_CLASSES
HEADS, HEAD_DIM, LAYERS = 4, 8, 2


def tiny_dit(out_channels: int | None = 8, identical_embedders: bool = True, seed: int = 0,
             norm_eps: float = 1e-5, num_classes: int = NUM_CLASSES):
    """A random 2-layer DiTTransformer2DModel (4 heads x 8, sample 8, patch 2), in eval mode.

    Every parameter gets extra noise so that no adaLN/gate/bias is trivially zero.
    ``DiTPipeline`` hard-codes the null class 1000, so pipeline tests use ``num_classes=1000``.
    """
    from diffusers import DiTTransformer2DModel

    g = torch.Generator().manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=out_channels,
        num_layers=LAYERS,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=4,
        norm_eps=norm_eps,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if identical_embedders:
            ref = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(ref)
    return model.eval()


def inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    labels = torch.tensor([1, 7, NUM_CLASSES, 3, 0, NUM_CLASSES][:batch])
    return x, labels


def sliced_block(block, heads: list[int], channels: list[int]) -> CompactBlockWeights:
    """Compact weights of a diffusers block keeping `heads` and MLP `channels`, no compensation."""
    attn, ff = block.attn1, block.ff
    kh = torch.tensor(heads, dtype=torch.int64)
    kc = torch.tensor(channels, dtype=torch.int64)
    spans = [torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads]
    rows = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)
    q, k, v = attn.to_q, attn.to_k, attn.to_v
    proj, fc1, fc2 = attn.to_out[0], ff.net[0].proj, ff.net[2]
    return CompactBlockWeights(
        kept_heads=kh,
        kept_channels=kc,
        qkv_weight=torch.cat([m.weight.detach()[rows] for m in (q, k, v)]).clone(),
        qkv_bias=torch.cat([m.bias.detach()[rows] for m in (q, k, v)]).clone(),
        proj_weight=proj.weight.detach()[:, rows].clone(),
        proj_bias=proj.bias.detach().clone(),
        fc1_weight=fc1.weight.detach()[kc].clone(),
        fc1_bias=fc1.bias.detach()[kc].clone(),
        fc2_weight=fc2.weight.detach()[:, kc].clone(),
        fc2_bias=fc2.bias.detach().clone(),
    )


def zeroed_reference(dense, heads_per_block, channels_per_block):
    """A copy of `dense` whose dropped heads / channels contribute nothing (zeroed consumers).

    Slicing without compensation must equal this model exactly (up to fp32 rounding).
    """
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for block, heads, channels in zip(ref.transformer_blocks, heads_per_block, channels_per_block):
            mask_h = torch.zeros(HEADS * HEAD_DIM, dtype=torch.bool)
            for h in heads:
                mask_h[h * HEAD_DIM:(h + 1) * HEAD_DIM] = True
            block.attn1.to_out[0].weight[:, ~mask_h] = 0
            mask_c = torch.zeros(block.ff.net[2].in_features, dtype=torch.bool)
            mask_c[channels] = True
            block.ff.net[2].weight[:, ~mask_c] = 0
    return ref


def two_stage_plan():
    """Kept heads/channels of a 2-stage plan: 'late' [0, 400) and 'early' [400, 1000)."""
    mlp = 4 * HEADS * HEAD_DIM
    late = ([[0, 1, 3], [2]], [list(range(0, mlp, 2)), list(range(mlp // 2))])
    early = ([[1], [0, 3]], [list(range(1, mlp, 3)), list(range(mlp // 4, mlp))])
    return {"late": (0, 400, late), "early": (400, 1000, early)}


def two_stage_specs(dense) -> list[StageSpec]:
    specs = []
    for name, (t0, t1, (heads, channels)) in two_stage_plan().items():
        blocks = [sliced_block(b, h, c) for b, h, c in zip(dense.transformer_blocks, heads, channels)]
        specs.append(StageSpec(name, t0, t1, 0.5, blocks))
    return specs

"""CompactDiTBlock and SharedConditioning against diffusers' BasicTransformerBlock (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.families.dit.blocks import CompactDiTBlock, SharedConditioning
from tests.runtime.dit_helpers import ATOL, HEAD_DIM, HEADS, RTOL, inputs, sliced_block, tiny_dit, zeroed_reference


def _block_inputs(dense, batch=3, t=(10.0, 10.0, 500.0)):
    """Token states entering block 0, and the timestep / label tensors."""
    x, labels = inputs(batch)
    with torch.no_grad():
        h = dense.pos_embed(x)
    return h, torch.tensor(t[:batch]), labels[:batch]


def _mods(block, t, labels, dtype=torch.float32):
    """diffusers' six modulation vectors of one block, each (B, C) contiguous."""
    with torch.no_grad():
        emb = block.norm1.emb(t, labels, hidden_dtype=dtype)
        return [m.contiguous() for m in block.norm1.linear(torch.nn.functional.silu(emb)).chunk(6, dim=1)]


def _diffusers_block(block, h, t, labels):
    with torch.no_grad():
        return block(h, timestep=t, class_labels=labels)


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-6])
def test_full_width_block_matches_diffusers(norm_eps):
    dense = tiny_dit(norm_eps=norm_eps)
    h, t, labels = _block_inputs(dense)
    for block in dense.transformer_blocks:
        compact = CompactDiTBlock(
            sliced_block(block, list(range(HEADS)), list(range(4 * HEADS * HEAD_DIM))),
            HEAD_DIM, eps=block.norm1.norm.eps, mlp_eps=block.norm3.eps,
        )
        with torch.no_grad():
            got = compact(h, _mods(block, t, labels))
        want = _diffusers_block(block, h, t, labels)
        assert_close(got, want, atol=ATOL, rtol=RTOL,
                     msg=lambda m: f"full-width block vs diffusers (norm_eps={norm_eps}): {m}")


@pytest.mark.parametrize("heads, channels", [
    ([1, 3], list(range(0, 128, 3))),
    ([0], list(range(100, 128))),
    ([], list(range(10))),          # every head pruned: attention branch is the proj bias
    ([0, 2], []),                   # every channel pruned: MLP branch is the fc2 bias
])
def test_sliced_block_matches_zeroed_diffusers(heads, channels):
    dense = tiny_dit()
    h, t, labels = _block_inputs(dense)
    block = dense.transformer_blocks[1]
    compact = CompactDiTBlock(sliced_block(block, heads, channels), HEAD_DIM, mlp_eps=block.norm3.eps)
    ref = zeroed_reference(dense, [heads, heads], [channels, channels]).transformer_blocks[1]
    with torch.no_grad():
        got = compact(h, _mods(block, t, labels))
    want = _diffusers_block(ref, h, t, labels)
    assert compact.num_heads == len(heads) and compact.mlp_width == len(channels)
    assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"heads={heads} channels={len(channels)}: {m}")
    # The pruning is real: the result differs from the unpruned block.
    full = _diffusers_block(block, h, t, labels)
    assert (got - full).abs().max() > 1e-3


@pytest.mark.auto_backend
def test_block_through_default_dispatch_matches_diffusers():
    """The same check through the ops' default dispatch (Triton interpreter on CPU when enabled)."""
    dense = tiny_dit()
    h, t, labels = _block_inputs(dense, batch=2)
    block = dense.transformer_blocks[0]
    weights = sliced_block(block, [0, 2, 3], list(range(0, 128, 2)))
    compact = CompactDiTBlock(weights, HEAD_DIM, mlp_eps=block.norm3.eps)
    ref = zeroed_reference(dense, [[0, 2, 3]] * 2, [list(range(0, 128, 2))] * 2).transformer_blocks[0]
    with torch.no_grad():
        got = compact(h, _mods(block, t, labels))
    want = _diffusers_block(ref, h, t, labels)
    assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"default dispatch: {m}")


def test_block_weights_are_frozen_and_convert():
    dense = tiny_dit()
    block = dense.transformer_blocks[0]
    compact = CompactDiTBlock(sliced_block(block, [1, 2], list(range(64))), HEAD_DIM)
    params = dict(compact.named_parameters())
    assert set(params) == {"qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                           "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}
    assert not any(p.requires_grad for p in params.values())
    compact.to(torch.float64)
    assert compact.qkv_weight.dtype == torch.float64
    assert compact.kept_heads.dtype == torch.int64 and compact.kept_heads.tolist() == [1, 2]
    w = compact.weights()
    assert w.num_heads == 2 and w.mlp_width == 64 and w.qkv_weight.data_ptr() == compact.qkv_weight.data_ptr()
    assert "heads=2" in repr(compact) and "mlp_width=64" in repr(compact)


@pytest.mark.parametrize("field, bad_shape",
                         [("qkv_weight", (47, 32)), ("proj_weight", (32, 8)), ("fc2_bias", (31,))])
def test_block_rejects_inconsistent_shapes(field, bad_shape):
    w = sliced_block(tiny_dit().transformer_blocks[0], [0, 1], list(range(16)))
    setattr(w, field, torch.zeros(bad_shape))
    with pytest.raises(ValueError, match=field):
        CompactDiTBlock(w, HEAD_DIM)


@pytest.mark.parametrize("identical", [True, False], ids=["shared-emb", "per-block-emb"])
def test_shared_conditioning_matches_per_block_adaln(identical):
    dense = tiny_dit(identical_embedders=identical)
    blocks = dense.transformer_blocks
    embedders = [blocks[0].norm1.emb] if identical else [b.norm1.emb for b in blocks]
    cond = SharedConditioning.from_blocks(
        embedders, [b.norm1.linear.weight for b in blocks], [b.norm1.linear.bias for b in blocks]
    )
    assert cond.shared_embedder == identical
    assert tuple(cond.mod_weight.shape) == (len(blocks) * 6 * 32, 32)
    _, t, labels = _block_inputs(dense)
    with torch.no_grad():
        emb, mods = cond(t, labels, hidden_dtype=torch.float32)
    assert mods.shape == (len(blocks), 6, 3, 32) and mods.is_contiguous()
    for l, block in enumerate(blocks):
        for k, want in enumerate(_mods(block, t, labels)):
            assert_close(mods[l, k], want, atol=ATOL, rtol=RTOL, msg=lambda m: f"block {l} vector {k}: {m}")
    with torch.no_grad():
        want_emb = blocks[0].norm1.emb(t, labels, hidden_dtype=torch.float32)
    assert_close(emb, want_emb, atol=0, rtol=0, msg=lambda m: f"final-layer embedding: {m}")


def test_shared_conditioning_validates_shapes():
    emb = tiny_dit().transformer_blocks[0].norm1.emb
    with pytest.raises(ValueError, match=r"block 1: adaLN linear must be \(192, 32\)"):
        SharedConditioning.from_blocks(emb, [torch.zeros(192, 32), torch.zeros(190, 32)], [torch.zeros(192)] * 2)
    with pytest.raises(ValueError, match="need 1 shared embedder or one per block"):
        SharedConditioning([emb, emb, emb], torch.zeros(384, 32), torch.zeros(384), num_layers=2)

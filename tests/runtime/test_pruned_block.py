"""`diffusers_dit.prune_block` (OBS, `compact.prune_groups`) run through `CompactDiTBlock` at nonzero sparsity.

Reference: diffusers' own block with the pruned heads' and channels' consumer columns removed
(zeroed) and the kept ones set to the least-squares refit on the calibration activations,
computed here with ``torch.linalg.lstsq`` (not by OBS). The compact block must compute exactly
that block, and the refit must matter (plain slicing is far off).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.families.dit.blocks import CompactDiTBlock
from mosaicdiff.families.dit import adapter as dit
from tests.runtime.dit_helpers import ATOL, HEAD_DIM, HEADS, RTOL, tiny_dit


def _block_inputs(dense, batch: int):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    labels = torch.randint(0, 11, (batch,), generator=g)
    with torch.no_grad():
        return dense.pos_embed(x).contiguous(), t, labels


def _mods(block, t, labels):
    with torch.no_grad():
        emb = block.norm1.emb(t, labels, hidden_dtype=torch.float32)
        return [m.contiguous() for m in block.norm1.linear(torch.nn.functional.silu(emb)).chunk(6, dim=1)]


def _consumer_inputs(block, h, t, labels):
    """The (tokens, features) inputs of proj and fc2 when the dense block runs."""
    lin = dit.block_linears(block)
    caught = {}
    handles = [lin[n].register_forward_hook(
        lambda mod, args, out, n=n: caught.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in ("proj", "fc2")]
    with torch.no_grad():
        block(h, timestep=t, class_labels=labels)
    for hd in handles:
        hd.remove()
    return caught


def _refit(weight, X, kept):
    """argmin_W' ||X[:, kept] W'^T - X W^T||: the consumer refit on the kept inputs."""
    target = X @ weight.double().T
    return torch.linalg.lstsq(X[:, kept], target).solution.T


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_obs_pruned_block_matches_refit_dense_block(sparsity):
    dense = tiny_dit()
    block = dense.transformer_blocks[1]
    h, t, labels = _block_inputs(dense, batch=16)  # 256 tokens > 128 MLP channels: full-rank H
    X = _consumer_inputs(block, h, t, labels)
    hessians = {n: X[n].T @ X[n] / X[n].shape[0] for n in ("proj", "fc2")}
    w = dit.prune_block(dit.block_linears(block), hessians, HEADS, sparsity, sparsity, align=None)
    assert 0 < w.num_heads < HEADS and 0 < w.mlp_width < 4 * HEADS * HEAD_DIM

    # reference: diffusers' block, removed columns zeroed, kept ones refit by least squares
    head_cols = torch.cat([torch.arange(k * HEAD_DIM, (k + 1) * HEAD_DIM) for k in w.kept_heads.tolist()])
    ref = copy.deepcopy(block)
    with torch.no_grad():
        for lin, cols in ((ref.attn1.to_out[0], head_cols), (ref.ff.net[2], w.kept_channels)):
            refit = _refit(lin.weight, X["proj" if lin is ref.attn1.to_out[0] else "fc2"], cols)
            lin.weight.zero_()
            lin.weight[:, cols] = refit.float()
    assert_close(w.proj_weight, ref.attn1.to_out[0].weight[:, head_cols], atol=1e-4, rtol=1e-4,
                 msg=lambda m: f"OBS proj vs least-squares refit: {m}")
    assert_close(w.fc2_weight, ref.ff.net[2].weight[:, w.kept_channels], atol=1e-4, rtol=1e-4,
                 msg=lambda m: f"OBS fc2 vs least-squares refit: {m}")

    mods = _mods(block, t, labels)
    compact_block = CompactDiTBlock(w, HEAD_DIM, eps=block.norm1.norm.eps, mlp_eps=block.norm3.eps)
    with torch.no_grad():
        got = compact_block(h, mods)
        want = ref(h, timestep=t, class_labels=labels)
        # the fused path (next norm folded in) carries the same residual stream
        x = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=compact_block.eps) * (1 + mods[1][:, None]) \
            + mods[0][:, None]
        fused, _ = compact_block.forward_normed(h, x, mods, (mods[0], mods[1], 1e-6))
    assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"compact block vs refit diffusers block: {m}")
    assert_close(fused, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"fused compact block vs refit block: {m}")

    # the compensation is what makes it match: slicing alone is far from the reference
    sliced = copy.deepcopy(w)
    sliced.proj_weight = block.attn1.to_out[0].weight.detach()[:, head_cols].clone()
    sliced.fc2_weight = block.ff.net[2].weight.detach()[:, w.kept_channels].clone()
    with torch.no_grad():
        uncompensated = CompactDiTBlock(sliced, HEAD_DIM, eps=block.norm1.norm.eps, mlp_eps=block.norm3.eps)(h, mods)
    assert float((uncompensated - want).abs().max()) > 100 * ATOL

"""The fused block chain of `MosaicUNet` (`StageSwitchedChain`) against the blocks run one by one.

Oracle: diffusers' ``BasicTransformerBlock`` formula written out in plain torch on a compact
block's tensors (``F.layer_norm``, ``F.linear``, SDPA per head, GEGLU): no mosaic op, no fusion.
A pruned mosaic of diffusers' tiny SDXL test U-Net has 6 ``Transformer2DModel``s of 2 blocks each,
so every chain has a fused block boundary (ff residual of block 0 + LN1 of block 1) and a fused
last ff2 (``linear_residual``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.testing import assert_close

import mosaicdiff
from mosaic_kernels import ops
from mosaicdiff.families.unet.model import StageSwitchedChain
from tests.method.test_unet_adapter import TEXT, tiny_unet, unet_inputs


def reference_block(block, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """diffusers' ``BasicTransformerBlock`` (``norm_type="layer_norm"``, GEGLU) on compact block
    `block`'s tensors in the copy layout (``[q | k | v]``, ``[k | v]``, ``[value | gate]``: a
    shared-producer block's `weights()` re-lays its views out so)."""
    B, L, C = h.shape
    hd, (h1, h2), b = block.head_dim, block.heads, block.weights()

    def ln(k, t):
        return F.layer_norm(t, (C,), getattr(b, f"norm{k}_weight"), getattr(b, f"norm{k}_bias"), block.eps)

    def attend(q, k, v, n):
        split = [t.reshape(B, t.shape[1], n, hd).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(B, L, n * hd)

    q, k, v = F.linear(ln(1, h), b.qkv1_weight, b.qkv1_bias).chunk(3, dim=-1)
    h = h + F.linear(attend(q, k, v, h1), b.out1_weight, b.out1_bias)
    k, v = F.linear(text, b.kv2_weight, b.kv2_bias).chunk(2, dim=-1)
    h = h + F.linear(attend(F.linear(ln(2, h), b.q2_weight, b.q2_bias), k, v, h2), b.out2_weight, b.out2_bias)
    value, gate = F.linear(ln(3, h), b.ff1_weight, b.ff1_bias).chunk(2, dim=-1)
    return h + F.linear(value * F.gelu(gate), b.ff2_weight, b.ff2_bias)


class OneByOne(nn.Module):
    """Block `j` of `chain`'s current stage on its own: `reference_block` or the block's drop-in forward."""

    def __init__(self, chain: StageSwitchedChain, j: int, drop_in: bool):
        super().__init__()
        object.__setattr__(self, "chain", chain)
        self.j, self.drop_in = j, drop_in

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        block = self.chain.blocks()[self.j]
        if self.drop_in:
            return block(hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)
        return reference_block(block, hidden_states, encoder_hidden_states)


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "copies"])
def mosaic(request):
    """A pruned mosaic at sparsity 0.5 (magnitude, no calibration: one stage, ``"all"``), with its
    producers in shared storage (the default) or owned by the blocks."""
    out = mosaicdiff.prune(tiny_unet(), None, 0.5, method="magnitude", progress=False,
                           share_producers=request.param)
    assert (out.producer_storage is not None) == request.param
    return out


def _chains(mosaic) -> list[tuple[Transformer2DModel, StageSwitchedChain]]:
    return [(m, m.transformer_blocks[0]) for m in mosaic.unet.modules() if isinstance(m, Transformer2DModel)]


def test_each_transformer_model_runs_one_chain_over_its_blocks(mosaic):
    chains = _chains(mosaic)
    assert len(chains) == 6 and all(len(m.transformer_blocks) == 1 for m, _ in chains)
    assert [(c.start, c.stop) for _, c in chains] == [(2 * i, 2 * i + 2) for i in range(6)]
    assert not any(list(c.parameters()) or list(c.buffers()) for _, c in chains), "a chain holds no weights"
    assert not [k for k in mosaic.state_dict() if "transformer_blocks" in k], "the saved keys are unchanged"
    assert not list(chains[0][1].blocks()[0].children()), "a block references the producer storage, not owns it"


def test_chain_equals_the_blocks_one_by_one(mosaic):
    """Every chain, fed (B, L, C) states, against the reference blocks and the blocks' own forwards."""
    g = torch.Generator().manual_seed(4)
    text = torch.randn(2, 7, TEXT, generator=g)
    for _, chain in _chains(mosaic):
        blocks = chain.blocks()
        assert len(blocks) == 2 and blocks[0].heads != (4, 4)  # pruned
        h = torch.randn(2, 24, blocks[0].out1_bias.numel(), generator=g)
        with torch.no_grad():
            got = chain(h, encoder_hidden_states=text)
            want, drop_in = h, h
            for b in blocks:
                want, drop_in = reference_block(b, want, text), b(drop_in, encoder_hidden_states=text)
        assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"chain {chain.start}..: {m}")
        assert_close(drop_in, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"drop-in blocks {chain.start}..: {m}")


@pytest.mark.parametrize("drop_in", [False, True], ids=["reference", "drop-in"])
def test_fused_unet_equals_the_unet_of_single_blocks(mosaic, drop_in):
    """The whole U-Net: chains vs every block run on its own, in both stages."""
    x, text, added = unet_inputs()
    chains = _chains(mosaic)
    for t in (800, 100):
        tt = torch.full((2,), t)
        with torch.no_grad():
            fused = mosaic(x, tt, text, added_cond_kwargs=added).sample
            try:
                for m, chain in chains:
                    m.transformer_blocks = nn.ModuleList(OneByOne(chain, j, drop_in) for j in range(len(chain)))
                single = mosaic(x, tt, text, added_cond_kwargs=added).sample
            finally:
                for m, chain in chains:
                    m.transformer_blocks = nn.ModuleList([chain])
        assert_close(fused, single, atol=2e-5, rtol=1e-5, msg=lambda m: f"t={t}: {m}")


def test_fused_path_calls_the_fused_ops_with_the_right_norms(mosaic, monkeypatch):
    """Spies on the ops: LN1 of the first block of each chain is ``layer_norm``; LN1 of the second
    comes from ``residual_layer_norm`` after block 0's ff2; the last ff2 is ``linear_residual``."""
    seen = {"layer_norm": [], "residual_layer_norm": [], "linear_residual": []}
    for name in seen:
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: seen[_name].append(a) or _real(*a, **kw))
    x, text, added = unet_inputs()
    with torch.no_grad(), ops.record_dispatch() as calls:
        mosaic(x, torch.full((2,), 300), text, added_cond_kwargs=added)
    stage = mosaic.stage_blocks[mosaic.current_stage]
    chains = [c for _, c in _chains(mosaic)]
    first = [stage[c.start] for c in chains]
    later = [stage[j] for c in chains for j in range(c.start + 1, c.stop)]
    last = [stage[c.stop - 1] for c in chains]

    def ids(tensors):
        return sorted(id(t) for t in tensors)

    assert ids(a[1] for a in seen["layer_norm"]) == ids(b.norm1_weight for b in first)
    rln_weights = [a[2] for a in seen["residual_layer_norm"]]
    assert ids(w for w in rln_weights if any(w is b.norm1_weight for b in stage)) == ids(b.norm1_weight for b in later)
    assert len(rln_weights) == 2 * len(stage) + len(later)  # norm2 and norm3 of every block, norm1 of the later
    assert ids(a[1] for a in seen["linear_residual"]) == ids(b.ff2_weight for b in last)
    for a in seen["linear_residual"]:  # ff2 input and the stream entering the ff: (B, L, F) and (B, L, C)
        assert a[0].shape[-1] == a[1].shape[1] and a[3].shape[-1] == a[1].shape[0]
    assert calls[("linear_residual", "torch")] == len(chains) == 6
    assert calls[("layer_norm", "torch")] == len(chains)


@pytest.mark.auto_backend
def test_chain_on_the_triton_kernels_equals_the_reference(mosaic):
    """One chain with every op pinned to Triton (the interpreter here): the fused kernels, not
    the torch references, compose to the block formula."""
    if not ops.backends("cpu")["triton"]["available"] and not torch.cuda.is_available():
        pytest.skip("triton backend unavailable here")
    _, chain = _chains(mosaic)[2]
    g = torch.Generator().manual_seed(5)
    blocks = chain.blocks()
    h, text = torch.randn(2, 16, blocks[0].out1_bias.numel(), generator=g), torch.randn(2, 7, TEXT, generator=g)
    with torch.no_grad():
        want = reference_block(blocks[1], reference_block(blocks[0], h, text), text)
        with ops.use_backend("triton"), ops.record_dispatch() as calls:
            got = chain(h, encoder_hidden_states=text)
    assert calls[("linear_residual", "triton")] == 1 and calls[("residual_layer_norm", "triton")] == 5, dict(calls)
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_chain_refuses_masks(mosaic):
    _, chain = _chains(mosaic)[0]
    h = torch.randn(1, 4, chain.blocks()[0].out1_bias.numel())
    with pytest.raises(NotImplementedError, match="attention masks"):
        chain(h, attention_mask=torch.ones(1, 4), encoder_hidden_states=torch.randn(1, 7, TEXT))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        chain(h)

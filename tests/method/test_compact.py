"""Compact: width alignment, block pruning into CompactBlockWeights, and the diffusers DiT adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mosaicdiff.method import compact, obs
from mosaicdiff.families.dit import adapter as dit
from mosaicdiff.core import schedulers


def tiny_dit(heads: int = 4, head_dim: int = 8, layers: int = 2, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _linears(C: int = 24, heads: int = 4, F: int = 96, seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    lin = {n: nn.Linear(C, C) for n in "qkv"}
    lin["proj"] = nn.Linear(C, C)
    lin["fc1"] = nn.Linear(C, F)
    lin["fc2"] = nn.Linear(F, C)
    return lin


def _hessians(C: int = 24, F: int = 96, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in (("proj", C), ("fc2", F)):
        mix = torch.randn(n, n, generator=g, dtype=torch.float64)
        X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ mix
        out[name] = X.T @ X / X.shape[0]
    return out


# ----------------------------------------------------------------- alignment


@pytest.mark.parametrize("n_keep, multiple, n_total, expected", [
    (2301, 64, 4608, 2304),
    (2330, 64, 4608, 2304),
    (2336, 64, 4608, 2368),   # exactly half-way: rounds up
    (2304, 64, 4608, 2304),
    (10, 64, 4608, 64),       # never 0 when something is kept
    (0, 64, 4608, 0),
    (100, 64, 100, 100),      # nearest multiple 128 > n_total: the dense width
    (4600, 64, 4608, 4608),
    (3, None, 10, 3),
    (3, 1, 10, 3),
    (37, 8, None, 40),
])
def test_align_width(n_keep, multiple, n_total, expected):
    got = compact.align_width(n_keep, multiple, n_total)
    assert got == expected, f"align_width({n_keep}, {multiple}, {n_total}) = {got}, expected {expected}"


def test_align_width_errors():
    with pytest.raises(ValueError, match="n_keep"):
        compact.align_width(-1, 64, 10)
    with pytest.raises(ValueError, match="n_total"):
        compact.align_width(11, 64, 10)
    with pytest.raises(ValueError, match="multiple"):
        compact.align_width(5, 0, 10)


# ----------------------------------------------------------------- prune_block


@pytest.mark.parametrize("head_sparsity, expected_heads", [(0.0, 4), (0.25, 3), (0.5, 2), (0.6, 2), (0.7, 1)])
def test_prune_block_keeps_requested_heads(head_sparsity, expected_heads):
    lin, H = _linears(), _hessians()
    w = dit.prune_block(lin, H, 4, head_sparsity, 0.5, align=None)
    assert w.num_heads == expected_heads, f"s={head_sparsity}: kept {w.num_heads} heads"
    assert w.qkv_weight.shape == (3 * expected_heads * 6, 24)
    assert w.proj_weight.shape == (24, expected_heads * 6)


def test_prune_block_slices_and_compensates():
    lin, H = _linears(), _hessians()
    hd = 6
    w = dit.prune_block(lin, H, 4, 0.5, 0.5, align=8)
    # heads: consumer columns equal standalone OBS; producer rows are the kept heads' rows
    proj_ref, cols = obs.prune_columns(lin["proj"].weight, H["proj"], 2, hd)
    assert torch.equal(w.kept_heads, cols.view(-1, hd)[:, 0] // hd)
    assert_close(w.proj_weight, proj_ref, atol=0, rtol=0)
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in w.kept_heads.tolist()])
    qkv_ref = torch.cat([lin[n].weight[rows] for n in "qkv"])
    assert torch.equal(w.qkv_weight, qkv_ref)
    assert torch.equal(w.qkv_bias, torch.cat([lin[n].bias[rows] for n in "qkv"]))
    assert torch.equal(w.proj_bias, lin["proj"].bias) and torch.equal(w.fc2_bias, lin["fc2"].bias)
    # MLP: 96 * 0.5 = 48 = a multiple of 8
    assert w.mlp_width == 48
    fc2_ref, ch = obs.prune_columns(lin["fc2"].weight, H["fc2"], 48, 1)
    assert torch.equal(w.kept_channels, ch)
    assert_close(w.fc2_weight, fc2_ref, atol=0, rtol=0)
    assert torch.equal(w.fc1_weight, lin["fc1"].weight[ch]) and torch.equal(w.fc1_bias, lin["fc1"].bias[ch])
    assert w.fc2_weight.dtype == torch.float32


def test_prune_block_aligns_mlp_width():
    lin, H = _linears(), _hessians()
    w = dit.prune_block(lin, H, 4, 0.25, 0.3, align=16)  # 96 * 0.7 = 67.2 -> 67 -> 64
    assert w.mlp_width == 64 and w.fc1_weight.shape == (64, 24) and w.fc2_weight.shape == (24, 64)


def test_prune_block_zero_sparsity_is_dense():
    lin, H = _linears(), _hessians()
    w = dit.prune_block(lin, H, 4, 0.0, 0.0, align=64)
    assert torch.equal(w.qkv_weight, torch.cat([lin[n].weight for n in "qkv"]))
    assert torch.equal(w.proj_weight, lin["proj"].weight) and torch.equal(w.fc2_weight, lin["fc2"].weight)
    assert w.mlp_width == 96 and w.num_heads == 4


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_prune_block_baselines_do_not_compensate(method):
    lin = _linears()
    w = dit.prune_block(lin, None, 4, 0.5, 0.5, method=method, align=None,
                            generator=torch.Generator().manual_seed(0))
    cols = torch.cat([torch.arange(h * 6, (h + 1) * 6) for h in w.kept_heads.tolist()])
    assert torch.equal(w.proj_weight, lin["proj"].weight[:, cols])
    assert torch.equal(w.fc2_weight, lin["fc2"].weight[:, w.kept_channels])
    assert w.num_heads == 2 and w.mlp_width == 48


def test_prune_block_errors():
    lin, H = _linears(), _hessians()
    with pytest.raises(ValueError, match="at least one head"):
        dit.prune_block(lin, H, 4, 0.9, 0.5)  # round(3.6) = 4 heads
    with pytest.raises(ValueError, match="head_sparsity"):
        dit.prune_block(lin, H, 4, 1.0, 0.5)
    with pytest.raises(ValueError, match="mlp_sparsity"):
        dit.prune_block(lin, H, 4, 0.5, -0.1)
    with pytest.raises(ValueError, match="method"):
        dit.prune_block(lin, H, 4, 0.5, 0.5, method="taylor")
    with pytest.raises(ValueError, match="Hessian"):
        dit.prune_block(lin, None, 4, 0.5, 0.5)
    with pytest.raises(ValueError, match="num_heads"):
        dit.prune_block(lin, H, 5, 0.5, 0.5)
    with pytest.raises(ValueError, match="missing"):
        dit.prune_block({k: v for k, v in lin.items() if k != "q"}, H, 4, 0.5, 0.5)


# ----------------------------------------------------------------- diffusers adapter


def test_block_linears_and_dense_weights():
    model = tiny_dit()
    block = model.transformer_blocks[1]
    lin = dit.block_linears(block)
    assert lin["q"] is block.attn1.to_q and lin["proj"] is block.attn1.to_out[0]
    assert lin["fc1"] is block.ff.net[0].proj and lin["fc2"] is block.ff.net[2]
    w = dit.dense_block_weights(block, dit.model_num_heads(model))
    assert torch.equal(w.qkv_weight, torch.cat([block.attn1.to_q.weight, block.attn1.to_k.weight,
                                               block.attn1.to_v.weight]))
    assert torch.equal(w.qkv_bias, torch.cat([block.attn1.to_q.bias, block.attn1.to_k.bias, block.attn1.to_v.bias]))
    assert torch.equal(w.fc2_weight, block.ff.net[2].weight)
    assert w.fc2_weight.data_ptr() != block.ff.net[2].weight.data_ptr(), "must be a copy"
    assert w.kept_heads.tolist() == [0, 1, 2, 3] and w.mlp_width == 128
    assert dit.model_head_dim(model) == 8 and dit.model_num_heads(model) == 4


def test_prune_block_on_dit_block_matches_mlp_math():
    """Sliced fc1 + compensated fc2 of a real DiT block equal the LS-optimal MLP on its inputs."""
    model = tiny_dit()
    lin = dit.block_linears(model.transformer_blocks[0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g)
    hidden = torch.nn.functional.gelu(lin["fc1"](x), approximate="tanh").double()
    H = {"fc2": hidden.T @ hidden / 500, "proj": torch.eye(32, dtype=torch.float64)}
    w = dit.prune_block(lin, H, 4, 0.25, 0.5, align=None)
    with torch.no_grad():
        h_k = torch.nn.functional.gelu(x @ w.fc1_weight.T + w.fc1_bias, approximate="tanh").double()
        y = h_k @ w.fc2_weight.double().T
        K = w.kept_channels
        ls = torch.linalg.lstsq(hidden[:, K], hidden @ lin["fc2"].weight.double().T).solution.T
        y_ref = h_k @ ls.T
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"pruned MLP output vs LS refit\n{m}")


def test_embedders_identical():
    model = tiny_dit(layers=3)
    assert not dit.embedders_identical(model)  # random init: every block draws its own
    emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
    for b in model.transformer_blocks[1:]:
        b.norm1.emb.load_state_dict(emb0)
    assert dit.embedders_identical(model)
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.bias[0] += 1e-3
    assert not dit.embedders_identical(model)


def test_validate_dit_names_the_class():
    model = tiny_dit()
    dit.validate_dit(model)
    with pytest.raises(ValueError, match="got Linear"):
        dit.validate_dit(nn.Linear(2, 2))
    model.transformer_blocks[1].norm_type = "layer_norm"
    with pytest.raises(ValueError, match="norm_type='layer_norm'.*transformer_blocks\\[1\\]"):
        dit.validate_dit(model)
    model = tiny_dit()
    model.transformer_blocks[0] = nn.Identity()
    with pytest.raises(ValueError, match="got Identity"):
        dit.validate_dit(model)


def test_sampler_timesteps_default_and_copy():
    from diffusers import DDIMScheduler

    ts = schedulers.sampler_timesteps(50)
    assert ts.dtype == torch.int64 and ts[0] == 980 and ts[-1] == 0 and ts.numel() == 50
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    ts = schedulers.sampler_timesteps(20, sched)
    assert ts.numel() == 20 and sched.num_inference_steps is None, "the caller's scheduler must stay untouched"
    abar = schedulers.scheduler_alphas_cumprod(sched)
    assert abar.dtype == torch.float64 and abar.numel() == 1000
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.sampler_timesteps(0)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        schedulers.scheduler_alphas_cumprod(object())


def test_heads_are_removed_one_per_step_whatever_groups_per_step():
    """groups_per_step batches MLP channels only: heads always follow the exact greedy.

    On this problem a joint 4-head step keeps other heads than the greedy (checked below), so
    passing groups_per_step on to the head pruning would change the kept heads.
    """
    lin, H = _linears(C=48, heads=8, F=96, seed=0), _hessians(C=48, F=96, seed=1)
    greedy_w, greedy_cols = obs.prune_columns(lin["proj"].weight, H["proj"], 4, 6)
    joint_w, joint_cols = obs.prune_columns(lin["proj"].weight, H["proj"], 4, 6, groups_per_step=4)
    assert not torch.equal(greedy_cols, joint_cols), "the problem must tell the two apart"
    w = dit.prune_block(lin, H, 8, 0.5, 0.5, align=None, groups_per_step=4)
    assert w.kept_heads.tolist() == (greedy_cols.view(-1, 6)[:, 0] // 6).tolist()
    assert_close(w.proj_weight, greedy_w, atol=0, rtol=0)
    # ... while the MLP channels do use it (the knob is not dropped altogether)
    fc2_w, channels = obs.prune_columns(lin["fc2"].weight, H["fc2"], 48, 1, groups_per_step=4)
    assert torch.equal(w.kept_channels, channels)
    assert_close(w.fc2_weight, fc2_w, atol=0, rtol=0)
    greedy_channels = obs.prune_columns(lin["fc2"].weight, H["fc2"], 48, 1)[1]
    assert not torch.equal(channels, greedy_channels), "the MLP half must tell the two apart too"

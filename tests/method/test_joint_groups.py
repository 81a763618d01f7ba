"""Groups with two consumers (joint attention) and consumers shared by two groups (Flux's proj_out).

Oracles are brute force: the least-squares optimum ``W H[:, K] H[K, K]^-1`` of a kept set K and the
output error of every candidate removal, computed here independently of `mosaicdiff.method.obs`.
"""

import itertools

import pytest
import torch
from torch import nn

from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, hessian_keys
from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import collect_hessians


def _hessian(n: int, seed: int, tokens: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    return x.T @ x / tokens


def _linear(n_in: int, n_out: int, seed: int, scale: float = 1.0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        lin.weight.mul_(scale)
    return lin


def _ls_optimum(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The best weight on the columns `kept`: argmin_V (W - V S) H (W - V S)^T, S the selection."""
    return W @ H[:, kept] @ torch.linalg.inv(H[kept][:, kept])


def _error(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor) -> float:
    D = W.clone()
    D[:, kept] -= _ls_optimum(W, H, kept)
    return float(torch.einsum("oi,ij,oj->", D, H, D))


def _unit_cols(units, size: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + u * size + j for u in units for j in range(size)])


def test_two_consumers_remove_the_unit_of_least_summed_cost_and_compensate_each_with_its_own_hessian():
    heads, size = 4, 3
    n = heads * size
    producer = _linear(8, n, 0)
    out_a, out_b = _linear(n, 5, 1), _linear(n, 6, 2, scale=3.0)
    with torch.no_grad():  # alone, out_a would drop head 3; out_b costs nothing for head 0 and much for 3
        out_a.weight[:, 3 * size:] *= 1e-3
        out_b.weight[:, :size] = 0
    H_a, H_b = _hessian(n, 3), _hessian(n, 4)
    group = PrunableGroup("heads", out_a, (producer,), unit_size=size, more_consumers=(out_b,))
    pruned = compact.prune_groups({"attn": group}, {"attn": H_a, "attn:1": H_b}, 0.25)  # removes 1 head
    costs = {}
    for drop in range(heads):
        kept = _unit_cols([u for u in range(heads) if u != drop], size)
        costs[drop] = (_error(out_a.weight.detach(), H_a, kept) + _error(out_b.weight.detach(), H_b, kept))
    best = min(costs, key=costs.get)
    assert pruned["attn"].kept.tolist() == [u for u in range(heads) if u != best]
    kept = _unit_cols(pruned["attn"].kept.tolist(), size)
    for got, lin, H in ((pruned["attn"].consumer_weight, out_a, H_a),
                        (pruned["attn"].more_consumer_weights[0], out_b, H_b)):
        torch.testing.assert_close(got, _ls_optimum(lin.weight.detach(), H, kept), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pruned["attn"].producer_weights[0], producer.weight.detach()[kept])
    torch.testing.assert_close(pruned["attn"].more_consumer_biases[0], out_b.bias.detach())
    # the first consumer alone would choose head 3: the sum is what decides
    alone = {d: _error(out_a.weight.detach(), H_a, _unit_cols([u for u in range(heads) if u != d], size))
             for d in range(heads)}
    assert (min(alone, key=alone.get), best) == (3, 0)


def test_groups_sharing_a_consumer_are_pruned_in_order_on_one_compensated_weight():
    heads, size, channels = 3, 2, 5
    n = heads * size + channels
    consumer = _linear(n, 4, 5)
    q, mlp = _linear(8, heads * size, 6), _linear(8, channels, 7)
    H = _hessian(n, 8)
    groups = {"attn": PrunableGroup("heads", consumer, (q,), unit_size=size, units=heads),
              "mlp": PrunableGroup("channels", consumer, (mlp,), consumer_offset=heads * size, units=channels)}
    pruned = compact.prune_groups(groups, {"attn": H, "mlp": H}, {"attn": 0.34, "mlp": 0.4}, align=None)
    W = consumer.weight.detach()
    # the head: least error with everything else kept and compensated (the MLP columns included)
    mlp_cols = list(range(heads * size, n))
    head_err = {d: _error(W, H, torch.tensor(_unit_cols([u for u in range(heads) if u != d], size).tolist() + mlp_cols))
                for d in range(heads)}
    drop_head = min(head_err, key=head_err.get)
    kept_heads = [u for u in range(heads) if u != drop_head]
    assert pruned["attn"].kept.tolist() == kept_heads
    # the two channels: greedy on the weight the head removal left, one at a time
    kept_ch = list(range(channels))
    for _ in range(2):
        errs = {}
        for d in kept_ch:
            cols = _unit_cols(kept_heads, size).tolist() + [heads * size + c for c in kept_ch if c != d]
            errs[d] = _error(W, H, torch.tensor(cols))
        kept_ch.remove(min(errs, key=errs.get))
    assert pruned["mlp"].kept.tolist() == kept_ch
    # both groups' weights are the final optimum over the union of kept columns
    a_cols = _unit_cols(kept_heads, size)
    m_cols = torch.tensor([heads * size + c for c in kept_ch])
    best = _ls_optimum(W, H, torch.cat([a_cols, m_cols]))
    torch.testing.assert_close(torch.cat([pruned["attn"].consumer_weight, pruned["mlp"].consumer_weight], 1), best,
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pruned["mlp"].producer_weights[0], mlp.weight.detach()[kept_ch])


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_uncompensated_methods_slice_every_consumer_alike(method):
    size, heads = 2, 4
    out_a, out_b = _linear(heads * size, 3, 9), _linear(heads * size, 3, 10)
    group = PrunableGroup("heads", out_a, (_linear(4, heads * size, 11),), unit_size=size, more_consumers=(out_b,))
    pruned = compact.prune_groups({"attn": group}, None, 0.5, method=method, generator=torch.Generator().manual_seed(0))
    kept = _unit_cols(pruned["attn"].kept.tolist(), size)
    torch.testing.assert_close(pruned["attn"].consumer_weight, out_a.weight.detach()[:, kept])
    torch.testing.assert_close(pruned["attn"].more_consumer_weights[0], out_b.weight.detach()[:, kept])
    if method == "magnitude":  # the summed norm over both consumers decides
        norms = (out_a.weight.detach() ** 2 + out_b.weight.detach() ** 2).view(3, heads, size).sum((0, 2))
        assert pruned["attn"].kept.tolist() == sorted(norms.topk(2).indices.tolist())


def test_shared_consumer_columns_must_be_covered_exactly_once():
    consumer = _linear(10, 4, 12)
    producer = _linear(4, 6, 13)
    groups = {"attn": PrunableGroup("heads", consumer, (producer,), unit_size=2, units=3),
              "mlp": PrunableGroup("channels", consumer, (producer,), consumer_offset=7, units=3)}  # column 6 unread
    with pytest.raises(ValueError, match="cover each column exactly once"):
        compact.prune_groups(groups, None, 0.3, method="magnitude", align=None)
    with pytest.raises(ValueError, match="do not fit"):
        PrunableGroup("channels", consumer, (producer,), consumer_offset=8, units=3)
    with pytest.raises(ValueError, match="more_consumers"):
        PrunableGroup("heads", consumer, (producer,), unit_size=2, more_consumers=(_linear(6, 4, 14),))


def test_a_missing_or_misshaped_second_hessian_is_named():
    group = PrunableGroup("heads", _linear(4, 3, 15), (_linear(3, 4, 16),), unit_size=2,
                          more_consumers=(_linear(4, 3, 17),))
    with pytest.raises(ValueError, match="'attn:1'"):
        compact.prune_groups({"attn": group}, {"attn": _hessian(4, 0)}, 0.5)
    with pytest.raises(ValueError, match="'attn:1' must be"):
        compact.prune_groups({"attn": group}, {"attn": _hessian(4, 0), "attn:1": _hessian(5, 0)}, 0.5)


class _Block(nn.Module):
    """x -> [joint attention-like pair of consumers] and a consumer read by two groups."""

    def __init__(self):
        super().__init__()
        self.qkv, self.add_qkv = nn.Linear(6, 4), nn.Linear(6, 4)
        self.out, self.add_out = nn.Linear(4, 6), nn.Linear(4, 6)
        self.mlp = nn.Linear(6, 3)
        self.proj = nn.Linear(7, 6)  # reads [attention (4) | mlp (3)]

    def forward(self, x, ctx):
        a, c = self.qkv(x), self.add_qkv(ctx)
        y = self.out(torch.tanh(a)) + self.add_out(torch.tanh(c)).mean(1, keepdim=True)
        return y + self.proj(torch.cat([torch.tanh(a), torch.relu(self.mlp(x))], -1))


class _Adapter(ModelAdapter):
    name = "joint-test"

    def handles(self, model):
        return isinstance(model, _Block)

    def validate(self, model):
        pass

    def blocks(self, model):
        return [model]

    def groups(self, block):
        return {"joint": PrunableGroup("heads", block.out, (block.qkv, block.add_qkv), unit_size=2,
                                       more_consumers=(block.add_out,)),
                "attn": PrunableGroup("heads", block.proj, (block.qkv,), unit_size=2, units=2),
                "mlp": PrunableGroup("channels", block.proj, (block.mlp,), consumer_offset=4, units=3)}

    def run(self, model, x_t, t, condition):
        return model(x_t, condition["ctx"])

    check_calibration = dense_block = compact_block = block_widths = shared_skeleton = None


def test_collect_hessians_keys_every_consumer_and_hooks_a_shared_one_once():
    torch.manual_seed(0)
    block = _Block().double()
    x, ctx = torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(5, 2, 6, dtype=torch.float64)
    seen = {}
    for name in ("out", "add_out", "proj"):
        getattr(block, name).register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0]))
    hessians = collect_hessians(block, x, torch.zeros(5), {"ctx": ctx}, batch_size=2, progress=False,
                                adapter=_Adapter())[0]
    assert set(hessians) == {"joint", "joint:1", "attn", "mlp"}
    assert hessian_keys("joint", _Adapter().groups(block)["joint"]) == ["joint", "joint:1"]
    for key, name in (("joint", "out"), ("joint:1", "add_out"), ("attn", "proj"), ("mlp", "proj")):
        X = torch.cat([a.reshape(-1, a.shape[-1]) for a in seen[name]])
        torch.testing.assert_close(hessians[key], X.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)
    assert hessians["attn"] is hessians["mlp"]  # one hook, one matrix, divided once


def test_every_small_removal_matches_the_exhaustive_optimum_for_one_consumer_pair():
    """With one unit removed greedy OBS is exact: for every pair of Hessian seeds the kept set is the
    exhaustive argmin of the summed error."""
    size, heads = 2, 3
    for seed in range(3):
        out_a, out_b = _linear(heads * size, 3, 20 + seed), _linear(heads * size, 4, 30 + seed)
        H_a, H_b = _hessian(heads * size, 40 + seed), _hessian(heads * size, 50 + seed)
        group = PrunableGroup("heads", out_a, (_linear(3, heads * size, 60),), unit_size=size, more_consumers=(out_b,))
        got = compact.prune_groups({"g": group}, {"g": H_a, "g:1": H_b}, 0.34)["g"].kept.tolist()
        best = min(itertools.combinations(range(heads), heads - 1),
                   key=lambda k: _error(out_a.weight.detach(), H_a, _unit_cols(k, size))
                   + _error(out_b.weight.detach(), H_b, _unit_cols(k, size)))
        assert got == list(best)

"""scripts/compare_shared_consumers.py: stepwise stages reading jointly compensated shared consumers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import compare_shared_consumers as csc  # noqa: E402


def test_contiguous_groups_cover_the_stages_in_order():
    groups = csc.contiguous_groups(10, 3)
    assert groups == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert all(type(s) is int for g in groups for s in g), groups  # stage indices, usable as dict keys
    assert csc.contiguous_groups(2, 3) == [[0], [1]]


def test_a_reduced_run_shares_one_consumer_between_stages(tmp_path):
    out = tmp_path / "shared.json"
    assert csc.main(["--out", str(out), "--steps", "4", "--num-samples", "10", "--samples-per-stage", "8",
                     "--sparsity", "0.4", "--ranks", "2"]) == 0
    report = json.loads(out.read_text())
    psnr = {name: m["psnr_to_dense"] for name, m in report["models"].items()}
    assert set(psnr) == {"stepwise, own consumers", "one shared consumer (unit)", "one shared consumer (steps)",
                         "3 consumer groups (unit)", "2 consumer groups (unit)",
                         "one shared consumer + rank 2 per stage", "three stages"}
    memory = {name: m["memory_ratio"] for name, m in report["models"].items()}
    assert memory["one shared consumer (unit)"] < memory["one shared consumer + rank 2 per stage"] \
        < memory["stepwise, own consumers"], memory
    assert all(10 < v < 100 for v in psnr.values()), psnr  # pruned, not broken
    assert all(psnr[name] != psnr["stepwise, own consumers"] for name in psnr if "shared" in name or "groups" in name)
    assert len(report["stage_sparsities"]) == 4 and "one shared consumer (unit) - three stages" in report["differences"]


def test_the_shared_consumer_minimises_the_joint_objective():
    """Against a perturbed solution, the least-squares solution of the normal equations has the
    smaller summed stage error (a wrong sign or a missing term in A or B fails)."""
    torch.manual_seed(0)
    W, u = torch.randn(5, 12, dtype=torch.float64), 2
    X = [torch.randn(12, 40, dtype=torch.float64) for _ in range(3)]
    H = [x @ x.T for x in X]
    kept = [torch.arange(6), torch.arange(4), torch.arange(2)]  # nested units, storage order

    class Block:
        def __init__(self, units, w):
            self.kept_heads, self.proj_weight = units, torch.nn.Parameter(w.clone())
            self.kept_channels, self.fc2_weight = units, torch.nn.Parameter(w.clone())

    class Group:
        def __init__(self):
            self.consumer, self.unit_size, self.more_consumers = torch.nn.Linear(12, 5).double(), u, ()
            self.consumer.weight.data.copy_(W)

    class Adapter:
        @staticmethod
        def groups(block):
            return {"proj": Group(), "fc2": Group()}

    class Mosaic(torch.nn.Module):
        stage_names = ["a", "b", "c"]
        meta = {"steps_per_stage": {"a": 1, "b": 2, "c": 3}}

        def __init__(self):
            super().__init__()
            cols = [(k[:, None] * u + torch.arange(u)).reshape(-1) for k in kept]
            self.stage_blocks = [[Block(k, W[:, c])] for k, c in zip(kept, cols)]

    hessians = {s: [{"proj": H[s], "fc2": H[s]}] for s in range(3)}
    shared, extra = csc.share_consumers(Mosaic(), [None], Adapter(), hessians, [[0, 1, 2]], "steps")
    assert extra == 0

    def objective(weights):
        total = 0.0
        for s, w in enumerate(weights):
            cols = (kept[s][:, None] * u + torch.arange(u)).reshape(-1)
            full = torch.zeros_like(W)
            full[:, cols] = w
            total += (s + 1) * float(torch.trace((W - full) @ H[s] @ (W - full).T))
        return total

    got = [shared.stage_blocks[s][0].proj_weight.detach() for s in range(3)]
    best = objective(got)
    union = got[0]
    for _ in range(5):
        other = union + 1e-3 * torch.randn_like(union)
        assert best < objective([other[:, :2 * len(k)] for k in kept])
    assert torch.allclose(got[1], got[0][:, :8]) and torch.allclose(got[2], got[0][:, :4])  # one matrix


def test_the_low_rank_correction_is_the_best_in_the_stages_output_error():
    torch.manual_seed(1)
    delta, x = torch.randn(6, 9, dtype=torch.float64), torch.randn(9, 30, dtype=torch.float64)
    H = x @ x.T
    assert torch.allclose(csc.low_rank_correction(delta, H, 9), delta, atol=1e-8)  # full rank: all of it

    def error(d):
        return float(torch.trace((delta - d) @ H @ (delta - d).T))

    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    plain = (U[:, :2] * S[:2]) @ Vh[:2]  # best in the weights' own norm, not in the output's
    assert error(csc.low_rank_correction(delta, H, 2)) < error(plain)
    assert torch.linalg.matrix_rank(csc.low_rank_correction(delta, H, 2)) == 2

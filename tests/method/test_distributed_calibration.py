"""Data-parallel calibration: 2 gloo processes give the Hessians and the pruned model of one process.

One 2-process launch (`mosaicdiff.core.distributed.spawn_local`, the environment ``torchrun`` sets,
bounded in time) runs every distributed case; each rank saves what it computed and the tests
below compare it with the same calls made here, in one process without a process group.

Tolerance of the Hessians: the two ranks run exactly the batches of one process (same rows,
same batch size, one thread each), so the float32 activations are bitwise the same and only the
order of the float64 additions differs (per rank, then across ranks). That order changes a sum
of n terms by at most about ``n * eps64 * sum|terms|``; with a few thousand tokens this is below
``1e-12`` relative to the largest entry, which is the tolerance asserted (``RTOL_H``, ``ATOL_H``
times the largest entry). A rank that skipped the all-reduce would be off by about 50 %.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.core import distributed
from mosaicdiff.families.dit.adapter import DIT
from mosaicdiff.method.calibrate import Calibration, collect_hessians, stage_inputs

RTOL_H = 1e-12
ATOL_H = 1e-12  # times the largest |H| entry
BATCH = 6  # 24 calibration rows -> 4 batches: 2 per rank
STAGE = (200, 600)
PRUNE_KWARGS = dict(boundaries=(200, 600), samples_per_stage=12, align=None, batch_size=BATCH, progress=False,
                    seed=3)
LAUNCH_TIMEOUT_S = 120


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def tiny_calibration(n: int = 12, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 10, null_class=10)


def calibration_inputs(seed: int = 1):
    return stage_inputs(tiny_calibration(), *STAGE, 12, cfg=True, generator=torch.Generator().manual_seed(seed))


def _kept(mosaic) -> list:
    return [s["blocks"] for s in mosaic.config.stages]


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------- the launched ranks

CLI_PRUNE = ["prune", "--method", "uniform", "--sparsity", "0.4", "--samples-per-stage", "12", "--steps", "5",
             "--align", "8", "--seed", "3", "--batch-size", str(BATCH)]


def _rank_main(out: str, model_dir: str, calib_file: str, second_port: str) -> None:
    """One rank: `mosaicdiff prune` (the CLI), then Hessians, prune() and a rank with other inputs."""
    import sys

    import torch.distributed as dist

    from mosaicdiff.app.cli import main
    from mosaicdiff.families.dit.model import MosaicDiT
    from mosaicdiff.api import prune

    torch.set_num_threads(1)
    out = Path(out)
    rank = int(os.environ["RANK"])
    saves = []
    real_save = MosaicDiT.save_pretrained
    MosaicDiT.save_pretrained = lambda self, *a, **k: (saves.append(a), real_save(self, *a, **k))[1]
    sys.stderr = open(out / f"stderr-{rank}.txt", "w", buffering=1)  # noqa: SIM115 - the progress bars
    report = {"cli_code": main(CLI_PRUNE + ["--model", model_dir, "--calibration", calib_file,
                                            "--out", str(out / "cli-2ranks")])}  # the CLI starts the group
    report["cli_saves"] = len(saves)

    os.environ["MASTER_PORT"] = second_port  # a new group: not the port of the CLI's group, just closed
    dist.init_process_group("gloo")  # env://, as torchrun sets it
    report.update(world=distributed.world_size(), main=distributed.is_main_process())
    model = tiny_dit()
    x_t, t, cond = calibration_inputs()
    hessians = collect_hessians(model, x_t, t, cond, batch_size=BATCH, progress=False, adapter=DIT)
    torch.save(hessians, out / f"hessians-{rank}.pt")

    mosaic = prune(model, tiny_calibration(), 0.4, **PRUNE_KWARGS)
    torch.save({"state": mosaic.state_dict(), "kept": _kept(mosaic)}, out / f"mosaic-{rank}.pt")

    # a rank launched with another seed: every rank raises, none is left waiting
    other = calibration_inputs(seed=1 + rank)
    try:
        collect_hessians(model, *other, batch_size=BATCH, progress=False, adapter=DIT)
        report["mismatch_error"] = None
    except ValueError as exc:
        report["mismatch_error"] = str(exc)
    (out / f"report-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float32 forward passes
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs_on_disk(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("inputs")
    tiny_dit().save_pretrained(folder / "dit")
    calib = tiny_calibration()
    save_file({"x0": calib.x0, "labels": calib.labels}, str(folder / "calib.safetensors"))
    return folder / "dit", folder / "calib.safetensors"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, inputs_on_disk):
    """What each of 2 gloo ranks computed (one launch for all the tests of this module)."""
    out = tmp_path_factory.mktemp("ranks")
    model_dir, calib_file = inputs_on_disk
    distributed.spawn_local(_rank_main, 2, args=(str(out), str(model_dir), str(calib_file), free_port()),
                            timeout_s=LAUNCH_TIMEOUT_S)
    return out


# ----------------------------------------------------------------------------- without a process group

def test_helpers_without_a_process_group():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    sums = {"a": torch.ones(2, dtype=torch.float64)}
    assert distributed.all_reduce_sums(sums)["a"].tolist() == [1.0, 1.0]
    assert distributed.run_on_main(lambda: 7) == 7
    distributed.check_same_across_ranks({"seed": 1})
    distributed.check_same_tensor(torch.ones(1), "x")
    distributed.barrier()
    with distributed.launched_process_group("cpu") as device:  # no WORLD_SIZE here: no group
        assert device == "cpu" and not distributed.is_distributed()


@pytest.mark.parametrize("rows,batch,world", [(24, 6, 2), (10, 4, 3), (5, 8, 2), (64, 1, 5), (7, 2, 1)])
def test_batch_shard_deals_whole_batches_in_contiguous_runs(rows, batch, world):
    shards = [distributed.batch_shard(rows, batch, r, world) for r in range(world)]
    flat = [s for shard in shards for s in shard]
    assert flat == list(range(0, rows, batch)), "every batch of one process, once, in order"
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_one_process_result_is_unchanged(one_thread):
    """No process group: one pass over every batch, H = X^T X / tokens (hooks, not the code under test)."""
    model = tiny_dit()
    x_t, t, cond = calibration_inputs()
    got = collect_hessians(model, x_t, t, cond, batch_size=BATCH, progress=False, adapter=DIT)
    labels = cond["class_labels"]
    caught = [{"proj": [], "fc2": []} for _ in model.transformer_blocks]
    handles = [lin.register_forward_hook(lambda m, a, o, xs=e[n]: xs.append(a[0].reshape(-1, a[0].shape[-1])))
               for e, b in zip(caught, model.transformer_blocks)
               for n, lin in (("proj", b.attn1.to_out[0]), ("fc2", b.ff.net[2]))]
    with torch.no_grad():
        for s in range(0, x_t.shape[0], BATCH):
            model(x_t[s:s + BATCH], timestep=t[s:s + BATCH], class_labels=labels[s:s + BATCH])
    for h in handles:
        h.remove()
    for block, ref in zip(got, caught):
        for name, xs in ref.items():
            x = torch.cat(xs).double()
            assert_close(block[name], x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 2 ranks vs 1 process

def test_two_ranks_hessians_equal_one_process(two_ranks, one_thread):
    x_t, t, cond = calibration_inputs()
    single = collect_hessians(tiny_dit(), x_t, t, cond, batch_size=BATCH, progress=False, adapter=DIT)
    per_rank = [torch.load(two_ranks / f"hessians-{r}.pt") for r in range(2)]
    for rank, hessians in enumerate(per_rank):
        for i, (got, want) in enumerate(zip(hessians, single)):
            for name in want:
                scale = float(want[name].abs().max())
                assert_close(got[name], want[name], rtol=RTOL_H, atol=ATOL_H * scale,
                             msg=lambda m: f"rank {rank} block {i} {name}: 2-rank vs 1-process Hessian\n{m}")
    for a, b in zip(*per_rank):
        for name in a:
            assert torch.equal(a[name], b[name]), "all-reduce: both ranks hold the same sums"


def test_two_ranks_prune_the_same_model_as_one_process(two_ranks, one_thread):
    from mosaicdiff.api import prune

    single = prune(tiny_dit(), tiny_calibration(), 0.4, **PRUNE_KWARGS)
    want = single.state_dict()
    for rank in range(2):
        got = torch.load(two_ranks / f"mosaic-{rank}.pt")
        assert got["kept"] == _kept(single), f"rank {rank}: other heads/channels kept than in one process"
        assert got["state"].keys() == want.keys()
        for key, value in want.items():
            assert_close(got["state"][key], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"rank {rank} {key}\n{m}")


def test_ranks_with_other_inputs_fail_on_every_rank(two_ranks):
    for rank in range(2):
        report = json.loads((two_ranks / f"report-{rank}.json").read_text())
        assert (report["world"], report["main"]) == (2, rank == 0)
        assert report["mismatch_error"] is not None, f"rank {rank} accepted inputs that differ between ranks"
        assert "ranks disagree on the calibration inputs" in report["mismatch_error"]


def test_cli_prune_under_two_ranks_saves_once_the_one_process_model(two_ranks, inputs_on_disk, one_thread):
    from safetensors.torch import load_file

    from mosaicdiff.app.cli import main

    model_dir, calib_file = inputs_on_disk
    reports = [json.loads((two_ranks / f"report-{r}.json").read_text()) for r in range(2)]
    assert [r["cli_code"] for r in reports] == [0, 0]
    assert [r["cli_saves"] for r in reports] == [1, 0], "rank 0 saves, rank 1 does not"
    bars = [(two_ranks / f"stderr-{r}.txt").read_text() for r in range(2)]
    assert "calibrating:" in bars[0] and "pruning all (s=0.40):" in bars[0], bars[0]
    assert "calibrating" not in bars[1] and "pruning" not in bars[1], f"rank 1 showed progress or logs:\n{bars[1]}"
    single = two_ranks / "cli-1process"
    assert main(CLI_PRUNE + ["--model", str(model_dir), "--calibration", str(calib_file), "--out", str(single),
                             "--no-progress"]) == 0
    saved = two_ranks / "cli-2ranks"
    a, b = load_file(str(saved / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}\n{m}")
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (saved, single))
    assert config_a["stages"] == config_b["stages"]
    assert config_a["meta"] == config_b["meta"]

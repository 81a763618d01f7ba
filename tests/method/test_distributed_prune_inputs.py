"""`mosaicdiff prune` under torchrun with the same command line but different files per rank
(another node's copy of the model or the calibration data): refused on every rank in one line,
before any calibration pass, and nothing saved.

One 2-process gloo launch (`mosaicdiff.core.distributed.spawn_local`) runs both cases: each rank
works in its own folder holding ``dit/`` and ``calib.safetensors`` under the same relative names.
In the calibration case rank 1's labels are rolled by one: the same sums, so the inputs'
fingerprint in `collect_hessians` cannot tell them apart, and without the up-front digest the ranks
would sum their Hessians and save a model with exit 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mosaicdiff.core import distributed

CASES = ("model", "calibration")
LAUNCH_TIMEOUT_S = 120
PRUNE = ["prune", "--method", "uniform", "--sparsity", "0.4", "--samples-per-stage", "4", "--steps", "5",
         "--align", "8", "--batch-size", "8", "--no-progress", "--model", "dit", "--calibration", "calib.safetensors"]


def tiny_dit(seed: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _rank_main(root: str, ports: list[str]) -> None:
    """One rank: `mosaicdiff prune` once per case, in this rank's folder of that case."""
    import sys

    from mosaicdiff.app.cli import main

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report = {}
    for case, port in zip(CASES, ports):
        os.chdir(Path(root) / case / f"rank{rank}")
        os.environ["MASTER_PORT"] = port  # a group per run: a fresh port
        with open("stderr.txt", "w") as err:
            sys.stderr = err
            report[case] = main([*PRUNE, "--out", "out"])
            sys.stderr = sys.__stderr__
    (Path(root) / f"report-{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("prune-inputs")
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.randn(16, 4, 8, 8, generator=g), torch.arange(16) % 10
    for case in CASES:
        for rank in (0, 1):
            folder = root / case / f"rank{rank}"
            folder.mkdir(parents=True)
            other = rank == 1
            tiny_dit(seed=1 if other and case == "model" else 0).save_pretrained(folder / "dit")
            rolled = labels.roll(1) if other and case == "calibration" else labels
            save_file({"x0": x0, "labels": rolled}, str(folder / "calib.safetensors"))
    distributed.spawn_local(_rank_main, 2, args=(str(root), [_free_port(), _free_port()]), timeout_s=LAUNCH_TIMEOUT_S)
    return root


@pytest.mark.parametrize("case", CASES)
def test_ranks_with_different_files_fail_before_work(launched, case):
    for rank in (0, 1):
        code = json.loads((launched / f"report-{rank}.json").read_text())[case]
        folder = launched / case / f"rank{rank}"
        lines = [line for line in (folder / "stderr.txt").read_text().splitlines() if ": error: " in line]
        assert code == 2, (rank, code, (folder / "stderr.txt").read_text()[-2000:])
        assert len(lines) == 1 and lines[0].startswith("mosaicdiff prune: error: the ranks were launched with "
                                                       "different inputs"), lines
        differs = "dense model sha256" if case == "model" else "calibration data sha256"
        assert differs in lines[0] and "--model and --calibration files" in lines[0], lines[0]
        assert not (folder / "out").exists()

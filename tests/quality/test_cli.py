"""The `mosaicdiff` command line: subcommands run, errors are reported with exit code 2."""

from __future__ import annotations

import pytest
import torch

from mosaicdiff.cli import build_parser, main


def test_parser_has_all_subcommands():
    parser = build_parser()
    for cmd in ("demo", "prune", "sample", "bench", "eval"):
        args = parser.parse_args([cmd] + (["--out", "x"] if cmd == "prune" else []))
        assert args.command == cmd


def test_sample_writes_png(tmp_path):
    from PIL import Image

    out = tmp_path / "s.png"
    code = main(["sample", "--out", str(out), "--num-samples", "4", "--steps", "2", "--no-progress"])
    assert code == 0 and out.is_file()
    w, h = Image.open(out).size
    assert (w, h) == (4 * 34 + 2, 36), f"grid size {(w, h)}"  # 4 images of 32 px, 2 px padding


def test_bench_without_gpu_points_to_suite(capsys):
    if torch.cuda.is_available():
        pytest.skip("this test checks the message printed when no GPU is present")
    assert main(["bench"]) == 1
    assert "gpu_suite.py" in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", "--out", str(tmp_path / "m"), "--boundaries", "1,2,3"]) == 2
    assert "t_low,t_high" in capsys.readouterr().err


def test_prune_then_sample_saved_mosaic(tmp_path, capsys):
    """`prune` saves a mosaic directory that `sample` loads back (magnitude: no calibration pass)."""
    out = tmp_path / "mosaic"
    assert main(["prune", "--out", str(out), "--method", "magnitude", "--sparsity", "0.5", "--steps", "5",
                 "--no-progress"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "ratio" in capsys.readouterr().out
    png = tmp_path / "m.png"
    assert main(["sample", "--model", str(out), "--out", str(png), "--num-samples", "3", "--steps", "2",
                 "--labels", "1,2,3", "--no-progress"]) == 0
    assert png.is_file()

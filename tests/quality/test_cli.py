"""The `mosaicdiff` command line: subcommands run, errors are reported with exit code 2."""

from __future__ import annotations

import pytest
import torch

from mosaicdiff.app.cli import build_parser, main


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


def _tiny_dit_folder(folder):
    """A tiny random diffusers DiT (4 heads, 4 x 8 x 8 latents) saved as a model folder."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from dit_helpers import tiny_dit

    tiny_dit().save_pretrained(folder)
    return folder


def test_prune_obs_with_calibration_file(tmp_path, capsys):
    """`prune --method mosaic|uniform --calibration FILE`: OBS on the file's data (x0 norm recorded)."""
    import json

    from safetensors.torch import save_file

    model = _tiny_dit_folder(tmp_path / "dit")
    x0 = 2.0 * torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calib = tmp_path / "calib.safetensors"
    save_file({"x0": x0, "labels": torch.arange(12) % 10}, str(calib))
    r = float(x0.pow(2).mean())
    for method, stages in (("mosaic", ["early", "middle", "late"]), ("uniform", ["all"])):
        out = tmp_path / method
        assert main(["prune", "--model", str(model), "--calibration", str(calib), "--out", str(out), "--method",
                     method, "--sparsity", "0.4", "--samples-per-stage", "4", "--steps", "5", "--align", "8",
                     "--no-progress"]) == 0, capsys.readouterr().err
        meta = json.loads((out / "config.json").read_text())["meta"]
        assert meta["pruner"] == "obs" and meta["samples_per_stage"] == 4, meta
        assert abs(meta["x0_sq_norm"] - r) < 1e-4 * r, (meta["x0_sq_norm"], r)  # the file's data, not the digits
        assert [s["name"] for s in json.loads((out / "config.json").read_text())["stages"]] == stages
        assert (out / "model.safetensors").is_file()
    assert "saved uniform mosaic" in capsys.readouterr().out


def test_prune_max_stage_sparsity_reaches_the_api(tmp_path):
    import json

    out = tmp_path / "m"
    assert main(["prune", "--out", str(out), "--method", "mosaic", "--sparsity", "0.5", "--max-stage-sparsity", "0.55",
                 "--samples-per-stage", "2", "--steps", "5", "--no-progress"]) == 0
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["s_max"] == 0.55 and max(meta["stage_sparsities"]) <= 0.55 + 1e-9, meta


def test_eval_via_main(tmp_path, capsys):
    """`mosaicdiff eval` through `main()` on a tiny sweep: comma lists parsed, JSON and plot written."""
    import json

    out = tmp_path / "eval"
    assert main(["eval", "--out", str(out), "--sparsities", "0.25,0.5", "--guidance-scales", "1.5", "--methods",
                 "magnitude", "--num-samples", "4", "--steps", "2", "--samples-per-stage", "2", "--threads", "1",
                 "--no-progress"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["complete"] is True and saved["settings"]["sparsities"] == [0.25, 0.5]
    assert saved["settings"]["methods"] == ["magnitude"] and saved["settings"]["guidance_scales"] == [1.5]
    assert {(p["method"], p["sparsity"]) for p in saved["points"]} == {("magnitude", 0.25), ("magnitude", 0.5)}
    assert (out / "fid_vs_sparsity.png").is_file()
    assert "FID g=1.5" in capsys.readouterr().out


def test_sample_labels_and_guidance_reach_the_sampler(tmp_path, monkeypatch):
    import mosaicdiff.core.sampling

    seen = {}
    real = mosaicdiff.core.sampling.sample

    def spy(model, labels, **kwargs):
        seen.update(labels=labels.tolist(), **kwargs)
        return real(model, labels, **kwargs)

    monkeypatch.setattr(mosaicdiff.core.sampling, "sample", spy)
    png = tmp_path / "s.png"
    assert main(["sample", "--out", str(png), "--labels", "7, 3", "--guidance-scale", "2.5", "--steps", "1",
                 "--nrow", "1", "--no-progress"]) == 0
    assert seen["labels"] == [7, 3] and seen["guidance_scale"] == 2.5 and seen["num_inference_steps"] == 1
    assert png.is_file()


class _Stop(Exception):
    """Raised by a spy once it has seen the call (the long work is not the point)."""


@pytest.mark.parametrize("flags", [["--speed-threshold", "0.5", "--log-snr-weight", "0.1"],
                                   ["--M", "0.5", "--lam", "0.1"]], ids=["new names", "paper symbols"])
def test_stage_split_flags_reach_prune(flags, tmp_path, monkeypatch, capsys):
    import mosaicdiff.api

    seen = {}

    def spy(model, calibration, sparsity, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(mosaicdiff.api, "prune", spy)
    assert main(["prune", "--out", str(tmp_path / "m"), "--method", "magnitude", *flags, "--no-progress"]) == 1
    assert "_Stop" in capsys.readouterr().err
    assert seen["speed_threshold"] == 0.5 and seen["log_snr_weight"] == 0.1, seen
    assert "M" not in seen and "lam" not in seen, seen
    assert seen["share_producers"] is True


def test_independent_stages_flag_reaches_prune(tmp_path, monkeypatch, capsys):
    import mosaicdiff.api

    seen = {}

    def spy(model, calibration, sparsity, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(mosaicdiff.api, "prune", spy)
    assert main(["prune", "--out", str(tmp_path / "m"), "--method", "magnitude", "--independent-stages",
                 "--no-progress"]) == 1
    assert seen["share_producers"] is False


def test_stage_split_defaults_and_hidden_aliases():
    parser = build_parser()
    args = parser.parse_args(["prune", "--out", "x"])
    assert (args.speed_threshold, args.log_snr_weight) == (0.55, 0.0)
    sub = parser._subparsers._group_actions[0].choices
    for cmd in ("prune", "demo", "eval"):
        text = sub[cmd].format_help()
        assert "--speed-threshold" in text and "--log-snr-weight" in text, text
        assert "--M" not in text and "--lam" not in text, f"{cmd} --help shows the hidden aliases:\n{text}"


def test_method_names(tmp_path):
    """`prune` offers every method of the API; demo and eval compare all but random by default."""
    parser = build_parser()
    for method in ("mosaic", "uniform", "magnitude", "random"):
        assert parser.parse_args(["prune", "--out", "x", "--method", method]).method == method
    for cmd in ("demo", "eval"):
        assert parser.parse_args([cmd]).methods == ["mosaic", "uniform", "magnitude"]


@pytest.mark.parametrize("cmd,module,function", [("demo", "mosaicdiff.app.demo", "run_demo"),
                                                 ("eval", "mosaicdiff.app.evaluate", "run_eval")])
def test_experiment_flags_reach_the_run(cmd, module, function, tmp_path, monkeypatch):
    import importlib

    seen = {}

    def spy(out_dir, **kwargs):
        seen.update(out_dir=out_dir, **kwargs)
        raise _Stop

    monkeypatch.setattr(importlib.import_module(module), function, spy)
    out = tmp_path / "o"
    argv = [cmd, "--out", str(out), "--seed", "3", "--num-samples", "6", "--steps", "4", "--samples-per-stage", "5",
            "--methods", "uniform,mosaic", "--boundaries", "100,500", "--speed-threshold", "0.6",
            "--log-snr-weight", "0.2", "--no-progress"]
    assert main(argv) == 1
    assert seen.pop("out_dir") == out
    assert seen.pop("model") is None  # the embedded model, loaded by the run
    assert seen == {"seed": 3, "num_samples": 6, "steps": 4, "samples_per_stage": 5, "methods": ("uniform", "mosaic"),
                    "boundaries": (100, 500), "speed_threshold": 0.6, "log_snr_weight": 0.2, "progress": False,
                    "model_name": "digits-dit", "num_seeds": 1,
                    # demo: None is the embedded model's own scale, resolved by run_demo (subjects)
                    **({"sparsity": 0.5, "guidance_scale": None} if cmd == "demo" else
                       {"sparsities": [0.2, 0.3, 0.4, 0.5, 0.6], "guidance_scales": [1.5, 3.0]})}, seen
    # an embedded model by name, and several noise seeds
    seen.clear()
    assert main([cmd, "--out", str(out), "--model", "digits-unet", "--num-seeds", "3", "--no-progress"]) == 1
    assert (seen["model"], seen["model_name"], seen["num_seeds"]) == (None, "digits-unet", 3)


def test_sample_num_images_writes_the_npz_and_keeps_the_grid_mode(tmp_path, capsys):
    """`sample --num-images N --out DIR` writes DIR/samples.npz; without it --out is still a PNG grid."""
    import numpy as np

    out = tmp_path / "fid"
    assert main(["sample", "--num-images", "3", "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    with np.load(out / "samples.npz") as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert "wrote 3 images" in capsys.readouterr().out
    args = build_parser().parse_args(["sample"])
    assert (args.out, args.num_images, args.num_samples, args.nrow) == (None, None, None, None)  # grid defaults later


def test_prune_and_sample_help_describe_torchrun():
    sub = build_parser()._subparsers._group_actions[0].choices
    assert "torchrun" in sub["prune"].format_help() and "--batch-size" in sub["prune"].format_help()
    text = sub["sample"].format_help()
    for words in ("--num-images", "samples.npz", "arr_0", "torchrun", "resumes", "--vae"):
        assert words in text, words

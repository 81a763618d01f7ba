"""scripts/_digits_run.py: the options the embedded-model quality scripts share, and their experiment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import _digits_run  # noqa: E402


def parser(**options) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(parents=[_digits_run.run_options(**options)])


def test_out_is_required_unless_it_has_a_default(capsys):
    with pytest.raises(SystemExit):
        parser(num_samples=7).parse_args([])
    assert "--out" in capsys.readouterr().err
    args = parser(num_samples=7, out=Path("r.json")).parse_args([])
    assert (args.out, args.num_samples, args.steps, args.samples_per_stage, args.seed) == (Path("r.json"), 7, 50, 128, 0)


def test_model_and_num_seeds_are_set_with_or_without_their_options(capsys):
    args = parser(num_samples=1).parse_args(["--out", "r.json"])
    assert (args.model, args.num_seeds) == ("digits-dit", 1)
    with pytest.raises(SystemExit):  # not an option of this script
        parser(num_samples=1).parse_args(["--out", "r.json", "--num-seeds", "2"])
    args = parser(num_samples=1, models=["digits-dit", "digits-unet"], num_seeds=True).parse_args(
        ["--out", "r.json", "--model", "digits-unet", "--num-seeds", "3"])
    assert (args.model, args.num_seeds) == ("digits-unet", 3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser(num_samples=1, models=["digits-dit"]).parse_args(["--out", "r.json", "--model", "digits-unet"])
    assert "invalid choice: 'digits-unet'" in capsys.readouterr().err


def test_the_run_is_the_named_model_at_the_settings_the_scripts_always_used():
    from mosaicdiff.app import experiment
    from mosaicdiff.app.subjects import DigitsUNet

    args = parser(num_samples=5, models=["digits-dit", "digits-unet"], num_seeds=True).parse_args(
        ["--out", "r.json", "--model", "digits-unet", "--steps", "10", "--seed", "3", "--num-seeds", "2",
         "--samples-per-stage", "4"])
    run = _digits_run.prepare_run_from_args(args)
    assert (run.subject.name, run.steps, run.seeds, len(run.labels), run.samples_per_stage, run.progress) == (
        "digits-unet", 10, (3, 4), 10, 4, False)
    # before the shared module each script spelled these out: speed threshold 0.55, no log-SNR weight
    spelled_out = experiment.prepare(None, steps=10, seed=3, num_samples=5, samples_per_stage=4, boundaries=None,
                                     speed_threshold=0.55, log_snr_weight=0.0, progress=False,
                                     subject=DigitsUNet(), num_seeds=2)
    assert run.boundaries == spelled_out.boundaries
    assert (run.speed_threshold, run.log_snr_weight) == pytest.approx((0.55, 0.0), abs=1e-9)
    torch.testing.assert_close(run.noise, spelled_out.noise)
    assert torch.equal(run.labels, spelled_out.labels)

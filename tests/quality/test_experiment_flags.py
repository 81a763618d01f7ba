"""`mosaicdiff demo` / `eval` flag values the run could only refuse minutes later (after sampling the
dense model, leaving a partial report): refused before any work, in one line naming the flag and
the values that work, with nothing written.

Where each limit comes from: the mosaic allocation caps a stage at min(0.9, sparsity + 0.1)
(`mosaicdiff.method.stage_plan.default_s_max`) and demo/eval have no --max-stage-sparsity, so a
target above 0.9 cannot be reached; every stage must keep one of the model's attention heads
(digits-dit: 6 per block, so uniform < 0.9167; digits-unet: 4, so uniform < 0.875 and mosaic, whose
cap is 0.1 higher, < 0.775); the demo's stage-curve comparison needs 3 sampler steps.
"""

from __future__ import annotations

import pytest

from mosaicdiff.app import demo, evaluate
from mosaicdiff.app.cli import main

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


@pytest.fixture
def no_run(monkeypatch):
    """Records a run that starts and stops it at once, as Ctrl-C would (the CLI turns any other error
    into an exit status too)."""
    started = []

    def start(*args, **kwargs):
        started.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", start)
    monkeypatch.setattr(evaluate, "run_eval", start)
    return started


@pytest.mark.parametrize("argv,message", [
    (["demo", "--sparsity", "0.95"], "argument --sparsity: expected a sparsity in [0, 0.9]"),
    (["eval", "--sparsities", "0.3,0.95"], "argument --sparsities: expected a sparsity in [0, 0.9]"),
    (["eval", "--sparsities", "0.3,0.3"], "argument --sparsities: 0.3 is listed more than once in '0.3,0.3'"),
    (["eval", "--guidance-scales", "1.5,1.5"], "argument --guidance-scales: 1.5 is listed more than once"),
    (["demo", "--methods", "uniform,uniform"], "argument --methods: uniform is listed more than once"),
    (["demo", "--steps", "2"], "argument --steps: expected an integer >= 3, got '2'"),
    (["demo", "--model", "digits-unet", "--sparsity", "0.8"],
     "--sparsity 0.8: --methods mosaic lets a stage reach sparsity 0.9 (the cap min(0.9, sparsity + 0.1)), which "
     "removes all 4 attention heads per block of digits-unet; use --sparsity below 0.7750 or leave mosaic out"),
    (["demo", "--model", "digits-unet", "--sparsity", "0.9", "--methods", "uniform"],
     "--sparsity 0.9: --methods uniform prunes every stage at it, which removes all 4 attention heads per block of "
     "digits-unet; use --sparsity below 0.8750"),
    (["eval", "--model", "digits-unet", "--sparsities", "0.3,0.8", "--methods", "mosaic"],
     "--sparsities 0.8: --methods mosaic lets a stage reach sparsity 0.9"),
])
def test_refused_before_any_work(tmp_path, capsys, no_run, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"]) == EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"mosaicdiff {argv[0]}: error: ") and message in err[0], err
    assert not out.exists() and not no_run


@pytest.mark.parametrize("argv", [["demo", "--sparsity", "0.9"], ["demo", "--model", "digits-unet", "--sparsity",
                                                                   "0.85", "--methods", "uniform,magnitude"]])
def test_the_largest_working_values_start_the_run(tmp_path, no_run, argv):
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == EXIT_INTERRUPTED and no_run

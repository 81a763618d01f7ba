"""`scripts/compare_dense_weights.py`: the report that decides which dense weights ship.

The shipped weights compared with a copy of themselves must differ by exactly 0 on every metric
(same noise, same labels, same images), and an untrained model must come out separated and worse.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from mosaicdiff import zoo

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_dense_weights.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_dense_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copy_of_the_baseline_differs_by_zero_and_an_untrained_model_is_worse(tmp_path, script):
    from mosaicdiff.zoo import train_dit

    copy = tmp_path / "copy"
    shutil.copytree(zoo.DIGITS_DIT_DIR, copy)
    torch.manual_seed(0)
    untrained = tmp_path / "untrained"
    train_dit.build_model().save_pretrained(untrained)
    out = tmp_path / "out"
    script.main([f"same={copy}", f"untrained={untrained}", "--num-samples", "20", "--num-seeds", "2",
                 "--steps", "4", "--pair", "untrained:same", "--out", str(out)])
    report = json.loads((out / "dense_weights.json").read_text())
    assert set(report["models"]) == {"baseline", "same", "untrained"}
    same = report["models"]["same"]["minus_baseline"]
    for metric in ("fid", "pixel_w1", "class_accuracy", "speckle_rate"):
        assert same[metric]["value"] == 0.0 and same[metric]["low"] == 0.0 and same[metric]["high"] == 0.0
        assert not same["separated"][metric]
    worse = report["models"]["untrained"]["minus_baseline"]
    assert worse["fid"]["low"] > 0 and worse["separated"]["fid"]
    assert worse["class_accuracy"]["high"] < 0
    assert len(report["models"]["baseline"]["fid_per_seed"]) == 2
    assert report["models"]["baseline"]["training"]["steps"] >= 2000
    assert "class_accuracy" not in report["real_digits"] and report["real_digits"]["fid"] > 0
    # `same` has the baseline's images, so untrained - same is untrained - baseline, resample by resample
    assert report["pairs"]["untrained - same"] == worse


@pytest.mark.parametrize("arg, message", [("nofolder", "NAME=FOLDER"), ("x=/nonexistent", "no config.json")])
def test_bad_candidates_are_refused(tmp_path, script, capsys, arg, message):
    with pytest.raises(SystemExit):
        script.main([arg, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_duplicate_reserved_or_unknown_names_are_refused(tmp_path, script, capsys):
    folder = str(zoo.DIGITS_DIT_DIR)
    cases = (([f"a={folder}", f"a={folder}"], "unique"), ([f"baseline={folder}"], "unique"),
             ([f"a={folder}", "--pair", "a:b"], "not among the models"), ([f"a={folder}", "--pair", "a"], "A:B"))
    for args, message in cases:
        with pytest.raises(SystemExit):
            script.main([*args, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err

"""NaN/inf anywhere in the calibration data (prompt embeddings, negative embeddings, pooled
embeddings, time ids: when a TextCalibration is built; a ConditionedCalibration's conditions: by
``check``, which `mosaicdiff.prune` calls before any calibration pass), naming the argument and the
rows, not after the whole calibration pass as "hessian has non-finite entries"."""

from __future__ import annotations

import pytest
import torch

import mosaicdiff
from mosaicdiff.calibrate import ConditionedCalibration, TextCalibration
from mosaicdiff.families.unet import testing

N = 6


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(N, 4, 16, 16, generator=g), "prompt_embeds": torch.randn(N, 7, 64, generator=g),
            "pooled_prompt_embeds": torch.randn(N, 32, generator=g), "add_time_ids": testing.TIME_IDS.clone(),
            "negative_prompt_embeds": torch.randn(1, 7, 64, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=g)}


@pytest.mark.parametrize("name,row", [("prompt_embeds", 2), ("pooled_prompt_embeds", 5), ("add_time_ids", 0),
                                      ("negative_prompt_embeds", 0), ("negative_pooled_prompt_embeds", 0)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_text_calibration_names_the_non_finite_argument(name, row, bad):
    kwargs = _inputs()
    kwargs[name][row].view(-1)[3] = bad
    with pytest.raises(ValueError, match=rf"^TextCalibration\.{name} contains NaN/inf at row \[{row}\] "):
        TextCalibration(**kwargs)


def test_conditions_are_checked_again_before_pruning():
    """A tensor changed after construction is found by ``check`` before any calibration pass."""
    calib = TextCalibration(**_inputs())
    calib.conditions["encoder_hidden_states"][4, 0, 0] = float("nan")  # the tensor the calibration holds
    with pytest.raises(ValueError, match=r"TextCalibration\.conditions\['encoder_hidden_states'\] contains NaN/inf at "
                                         r"index \[4\]"):
        mosaicdiff.prune(testing.tiny_dense(), calib, 0.3, boundaries=(300, 700), samples_per_stage=2, align=None,
                         progress=False)


def test_a_conditioned_calibration_checks_nested_and_null_conditions_before_any_pass():
    x = torch.randn(N, 4, 8, 8)
    added = {"text_embeds": torch.randn(N, 32), "time_ids": torch.zeros(N, 6)}
    added["time_ids"][1, 2] = float("inf")
    calib = ConditionedCalibration(x, {"encoder_hidden_states": torch.randn(N, 7, 64), "added_cond_kwargs": added})
    with pytest.raises(ValueError, match=r"^ConditionedCalibration\.conditions\['added_cond_kwargs'\]\['time_ids'\] "
                                         r"contains NaN/inf at index \[1\]"):
        calib.check()
    calib = ConditionedCalibration(x, {"emb": torch.randn(N, 3)}, {"emb": torch.full((1, 3), float("nan"))})
    with pytest.raises(ValueError, match=r"^ConditionedCalibration\.null_conditions\['emb'\] contains NaN/inf at "
                                         r"index \[0\]"):
        calib.check()

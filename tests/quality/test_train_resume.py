"""The zoo training scripts resume from their checkpoint with ``torch.load(weights_only=True)``:
the state (model / EMA / optimizer state dicts, torch's and the data generator's RNG states as
uint8 tensors, the step and the held-out history as plain numbers) loads without unpickling
arbitrary objects, and training continues from the saved step."""

from __future__ import annotations

import json

import pytest
import torch

from mosaicdiff.zoo import train_dit, train_pixart, train_unet


@pytest.fixture
def loads(monkeypatch):
    """Every ``torch.load`` call's ``weights_only``, the real load still done."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("script", [train_dit, train_unet, train_pixart], ids=["train_dit", "train_unet", "train_pixart"])
def test_resume_loads_the_state_weights_only(tmp_path, monkeypatch, loads, script):
    monkeypatch.setattr(script, "held_out_loss", lambda *args, **kwargs: 0.5)  # (seconds; not under test)
    out = tmp_path / "run"
    args = ["--out", str(out), "--batch-size", "4", "--save-every", "1"]
    warmup = ["--warmup-steps", "0"] if script is train_pixart else []  # its default (100) needs > 100 steps
    script.main([*args, *warmup, "--steps", "1"])
    script.main([*args, *warmup, "--steps", "2", "--resume"])
    assert loads and all(w is True for w in loads), loads
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["data_rng"].dtype == torch.uint8 and "state" in state["opt"]
    assert json.loads((out / "training.json").read_text())["checkpoint_step"] == 2

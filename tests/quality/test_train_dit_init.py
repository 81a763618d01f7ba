"""`zoo.train_dit --init-from`: training continues from an exported model, EMA included.

The oracle is the exported source model itself: with a learning rate of 0 the optimiser and the
EMA leave the weights where they start, so both exported weight sets must equal the source exactly
(AdamW with lr 0 and ``lerp`` towards equal weights change nothing). Starting the EMA from the
random initialisation, or not loading the source at all, fails these tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mosaicdiff.zoo import train_dit


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A randomly initialised model of the script's shape, exported with tied (identical) embedders."""
    torch.manual_seed(3)
    model = train_dit.build_model()
    train_dit.tie_embedders(model)
    folder = tmp_path_factory.mktemp("source")
    train_dit.untie_embedders(model).save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"steps": 123, "seed": 9}))
    return folder


def _weights(folder):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(folder).state_dict()


def _train(out, source, *extra):
    train_dit.main(["--out", str(out), "--init-from", str(source), "--steps", "2", "--batch-size", "8",
                    "--save-every", "2", *extra])


def test_init_from_keeps_the_source_at_lr_zero_in_model_and_ema(tmp_path, source):
    out = tmp_path / "run"
    _train(out, source, "--lr", "0")
    want = _weights(source)
    got_model = _weights(out)
    train_dit.main(["--out", str(out), "--export-only", "--export", "ema", "--export-dir", str(tmp_path / "ema")])
    got_ema = _weights(tmp_path / "ema")
    for name, w in want.items():
        assert torch.equal(got_model[name], w), name
        assert torch.equal(got_ema[name], w), name
    info = json.loads((out / "training.json").read_text())
    assert info["init_from"] == {"path": str(source), "training": {"steps": 123, "seed": 9}}
    assert [h["step"] for h in info["held_out_eps_mse_history"]] == [2]
    assert json.loads((tmp_path / "ema" / "training.json").read_text())["exported"] == "ema"


def test_init_from_trains_away_from_the_source_at_a_positive_lr(tmp_path, source):
    out = tmp_path / "run"
    _train(out, source, "--lr", "1e-3")
    want, got = _weights(source), _weights(out)
    assert any(not torch.equal(got[name], w) for name, w in want.items())
    # the embedders stay tied in training, so the exported copies stay identical
    emb = [k for k in got if k.startswith("transformer_blocks.0.norm1.emb.")]
    for k in emb:
        for i in range(1, 6):
            assert torch.equal(got[k], got[k.replace("blocks.0.", f"blocks.{i}.")])


def test_init_from_refuses_untied_embedders_and_missing_folders(tmp_path, source):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(source)
    with torch.no_grad():
        next(model.transformer_blocks[3].norm1.emb.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="block 3"):
        _train(tmp_path / "a", tmp_path / "untied", "--lr", "0")
    with pytest.raises(FileNotFoundError, match="config.json"):
        _train(tmp_path / "b", tmp_path / "nothing", "--lr", "0")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_dit.export(tmp_path / "nothing")


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    peak, steps, warmup = 2e-4, 1000, 100
    assert train_dit.lr_at(0, steps, peak, warmup) == pytest.approx(peak / warmup)
    assert train_dit.lr_at(warmup - 1, steps, peak, warmup) == pytest.approx(peak)
    assert train_dit.lr_at(warmup, steps, peak, warmup) == pytest.approx(peak)
    mid = warmup + (steps - warmup) // 2
    assert train_dit.lr_at(mid, steps, peak, warmup) == pytest.approx(peak / 2)
    assert train_dit.lr_at(steps - 1, steps, peak, warmup) < peak * 1e-4
    # no warm-up: the original recipe's cosine from the first step
    assert train_dit.lr_at(0, 2000, 5e-4, 0) == pytest.approx(5e-4)
    assert train_dit.lr_at(500, 2000, 5e-4, 0) == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("extra, message", [(["--warmup-steps", "5"], "--warmup-steps"),
                                            (["--export-dir", "x"], "--export-only")])
def test_bad_schedule_and_export_flags_are_refused(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        train_dit.main(["--out", str(tmp_path), "--steps", "5", *extra])
    assert message in capsys.readouterr().err

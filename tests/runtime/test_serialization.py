"""save_pretrained / from_pretrained: bitwise round trip, validation errors, atomic save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mosaicdiff import serialization
from mosaicdiff._version import __version__
from mosaicdiff.mosaic import MosaicDiT
from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_plan, two_stage_specs


def _mosaic(identical=True):
    dense = tiny_dit(identical_embedders=identical)
    meta = {"method": "manual-slice", "boundaries": [400], "target_sparsity": 0.5}
    return MosaicDiT(dense, two_stage_specs(dense), source="tiny-random-dit", meta=meta)


def _outputs(mosaic):
    x, labels = inputs(batch=3)
    with torch.no_grad():
        return [mosaic(x, timestep=t, class_labels=labels).sample for t in (10, 399, 400, 999)]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("identical", [True, False], ids=["shared-emb", "per-block-emb"])
def test_round_trip_is_bitwise(tmp_path, identical):
    mosaic = _mosaic(identical)
    target = tmp_path / "mosaic"
    mosaic.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == []

    rng = torch.get_rng_state()
    loaded = MosaicDiT.from_pretrained(target)
    assert torch.equal(torch.get_rng_state(), rng), "loading must not consume the global RNG"

    for want, got in zip(_outputs(mosaic), _outputs(loaded)):
        assert torch.equal(want, got), f"round trip differs by {(want - got).abs().max()}"
    assert loaded.memory_report() == mosaic.memory_report()
    assert [(s.name, s.t_start, s.t_end, s.sparsity) for s in loaded.stages] == \
        [(s.name, s.t_start, s.t_end, s.sparsity) for s in mosaic.stages]
    assert loaded.config.sample_size == 8 and loaded.config.in_channels == 4 and loaded.config.out_channels == 8

    config = json.loads((target / "config.json").read_text())
    assert config["format_version"] == serialization.FORMAT_VERSION and config["package_version"] == __version__
    assert config["meta"] == {"method": "manual-slice", "boundaries": [400], "target_sparsity": 0.5,
                              "source": "tiny-random-dit"}
    plan = two_stage_plan()
    assert config["stages"][0]["blocks"][1]["kept_heads"] == plan["late"][2][0][1]
    assert config["stages"][1]["blocks"][0]["kept_channels"] == plan["early"][2][1][0]
    keys = load_file(target / "model.safetensors").keys()
    assert "shared.conditioning.mod_weight" in keys and "stages.1.blocks.0.fc2_weight" in keys


def test_save_overwrites_previous_mosaic_and_keeps_dtype(tmp_path):
    target = tmp_path / "mosaic"
    _mosaic().save_pretrained(target)
    half = _mosaic(identical=False).to(torch.float16)
    half.save_pretrained(target)  # replaces the previous save
    assert _leftovers(tmp_path) == []
    loaded = MosaicDiT.from_pretrained(target)
    assert loaded.dtype == torch.float16 and not loaded.shared.conditioning.shared_embedder
    for (k, a), (_, b) in zip(half.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    as_float = MosaicDiT.from_pretrained(target, torch_dtype=torch.float32, device="cpu")
    assert as_float.dtype == torch.float32


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved MosaicDiT"):
        _mosaic().save_pretrained(target)
    assert (target / "precious.txt").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_failure_during_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "mosaic"
    mosaic = _mosaic()

    def failing_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 64)  # a partial file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(serialization, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        mosaic.save_pretrained(target)
    assert not target.exists() and _leftovers(tmp_path) == []

    # With a previous save in place, a failed save keeps it intact and loadable.
    monkeypatch.setattr(serialization, "save_file", save_file)
    mosaic.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(serialization, "save_file", failing_save_file)
    with pytest.raises(OSError):
        _mosaic(identical=False).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and _leftovers(tmp_path) == []
    assert torch.equal(_outputs(MosaicDiT.from_pretrained(target))[0], _outputs(mosaic)[0])


@pytest.fixture
def saved(tmp_path):
    target = tmp_path / "mosaic"
    _mosaic().save_pretrained(target)
    return target


def _edit_config(path: Path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_weights(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        MosaicDiT.from_pretrained(saved)
    weights.write_bytes(data[:5])  # not even a header
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MosaicDiT.from_pretrained(saved)


def test_missing_files(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        MosaicDiT.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        MosaicDiT.from_pretrained(tmp_path / "nowhere")
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        MosaicDiT.from_pretrained(saved)


def test_config_weights_mismatch_names_the_key(saved):
    # Stage 0 ("late"), block 1 keeps head 2 only; the edited config claims heads 1 and 2.
    assert two_stage_plan()["late"][2][0][1] == [2]
    _edit_config(saved, lambda c: c["stages"][0]["blocks"][1].__setitem__("kept_heads", [1, 2]))
    with pytest.raises(ValueError, match=r"'stages\.0\.blocks\.1\.qkv_weight' .* shape \(24, 32\), "
                                         r"the config expects \(48, 32\)"):
        MosaicDiT.from_pretrained(saved)


def test_missing_and_unexpected_keys(saved):
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    missing = dict(tensors)
    del missing["stages.1.blocks.0.fc1_bias"]
    save_file(missing, weights)
    with pytest.raises(ValueError, match=r"lacks the tensor 'stages\.1\.blocks\.0\.fc1_bias'"):
        MosaicDiT.from_pretrained(saved)
    save_file({**tensors, "stages.2.blocks.0.fc1_bias": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"does not describe: \['stages\.2\.blocks\.0\.fc1_bias'\]"):
        MosaicDiT.from_pretrained(saved)
    shared = dict(tensors)
    shared["shared.proj_out_2.weight"] = torch.zeros(5, 32)
    save_file(shared, weights)
    with pytest.raises(ValueError, match=r"'shared\.proj_out_2\.weight' .* shape \(5, 32\)"):
        MosaicDiT.from_pretrained(saved)


def test_format_version_mismatch_names_both_versions(saved):
    _edit_config(saved, lambda c: c.__setitem__("format_version", "2.0"))
    with pytest.raises(ValueError, match=r"format version 2\.0 .* reads format version 1\.0"):
        MosaicDiT.from_pretrained(saved)
    _edit_config(saved, lambda c: c.__setitem__("format", "something-else"))
    with pytest.raises(ValueError, match="expected 'mosaicdiff.MosaicDiT'"):
        MosaicDiT.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MosaicDiT.from_pretrained(saved)


def test_newer_minor_version_loads_with_warning(saved, caplog):
    _edit_config(saved, lambda c: c.__setitem__("format_version", "1.7"))
    with caplog.at_level("WARNING", logger="mosaicdiff.serialization"):
        MosaicDiT.from_pretrained(saved)
    assert "newer than 1.0" in caplog.text

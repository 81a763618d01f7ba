"""save_pretrained / from_pretrained: bitwise round trip, validation errors, atomic save."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mosaicdiff.core import model_folder
from mosaicdiff._version import __version__
from mosaicdiff.families.dit.model import MosaicDiT
from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_plan, two_stage_specs


def _mosaic(identical=True):
    dense = tiny_dit(identical_embedders=identical)
    meta = {"method": "manual-slice", "boundaries": [400], "target_sparsity": 0.5}
    return MosaicDiT.from_dense(dense, two_stage_specs(dense), source="tiny-random-dit", meta=meta)


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
    assert config["format_version"] == MosaicDiT.format_version and config["package_version"] == __version__
    assert config["meta"] == {"method": "manual-slice", "boundaries": [400], "target_sparsity": 0.5,
                              "source": "tiny-random-dit"}
    plan = two_stage_plan()
    assert config["stages"][0]["blocks"][1]["kept_heads"] == plan["late"][2][0][1]
    assert config["stages"][1]["blocks"][0]["kept_channels"] == plan["early"][2][1][0]
    keys = load_file(target / "model.safetensors").keys()
    assert "shared.conditioning.mod_weight" in keys and "stage_blocks.1.0.fc2_weight" in keys
    # a diffusers config: the class, the dense DiT's architecture keys, the stages
    assert config["_class_name"] == "MosaicDiT" and config["num_attention_heads"] == 4 and config["num_layers"] == 2
    assert MosaicDiT.from_config(MosaicDiT.load_config(target)).num_stages == 2


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


def test_saves_next_to_unrelated_files(tmp_path):
    # Was: a folder of unrelated files was refused (the save replaced the whole folder). Now the
    # model's two files are written next to them (diffusers' semantics); see test_save_semantics.py.
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    _mosaic().save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_failure_during_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "mosaic"
    mosaic = _mosaic()

    def failing_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 64)  # a partial file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(model_folder, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        mosaic.save_pretrained(target)
    assert not target.exists() and _leftovers(tmp_path) == []

    # With a previous save in place, a failed save keeps it intact and loadable.
    monkeypatch.setattr(model_folder, "save_file", save_file)
    mosaic.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(model_folder, "save_file", failing_save_file)
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
    with pytest.raises(ValueError, match=r"'stage_blocks\.0\.1\.qkv_weight' .* shape \(24, 32\), "
                                         r"the config expects \(48, 32\)"):
        MosaicDiT.from_pretrained(saved)


def test_missing_and_unexpected_keys(saved):
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    missing = dict(tensors)
    del missing["stage_blocks.1.0.fc1_bias"]
    save_file(missing, weights)
    with pytest.raises(ValueError, match=r"lacks the tensor 'stage_blocks\.1\.0\.fc1_bias'"):
        MosaicDiT.from_pretrained(saved)
    save_file({**tensors, "stage_blocks.2.0.fc1_bias": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"does not describe: \['stage_blocks\.2\.0\.fc1_bias'\]"):
        MosaicDiT.from_pretrained(saved)
    shared = dict(tensors)
    shared["shared.proj_out_2.weight"] = torch.zeros(5, 32)
    save_file(shared, weights)
    with pytest.raises(ValueError, match=r"'shared\.proj_out_2\.weight' .* shape \(5, 32\)"):
        MosaicDiT.from_pretrained(saved)


def test_format_version_mismatch_names_both_versions(saved):
    _edit_config(saved, lambda c: c.__setitem__("format_version", "4.0"))
    with pytest.raises(ValueError, match=rf"format version 4\.0 .* reads format versions 1\.x, 2\.x, 3\.x \(writes "
                                         rf"{re.escape(MosaicDiT.format_version)}\)"):
        MosaicDiT.from_pretrained(saved)
    _edit_config(saved, lambda c: c.__setitem__("format", "something-else"))
    with pytest.raises(ValueError, match="expected 'mosaicdiff.MosaicDiT'"):
        MosaicDiT.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MosaicDiT.from_pretrained(saved)


def test_newer_minor_version_loads_with_warning(saved, caplog):
    _edit_config(saved, lambda c: c.__setitem__("format_version", "3.99"))
    with caplog.at_level("WARNING", logger="mosaicdiff.core.serialization"):
        MosaicDiT.from_pretrained(saved)
    assert f"newer than {MosaicDiT.format_version}" in caplog.text


# ------------------------------------------------------------------ invalid configs and arguments


def _listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("stages", 3), r"stages must be a list, got 3"),
    (_set("stages", []), r"stages must be a non-empty list, got \[\]"),
    (_set("dense_reference", "x"), r"dense_reference must be an object, got 'x'"),
    (_set("meta", [1]), r"meta must be an object, got \[1\]"),
    (_set("dtype", "int8"), r"dtype must be a torch float dtype name, got 'int8'"),
    (_set("dtype", "nope"), r"dtype must be a torch float dtype name, got 'nope'"),
    (_set("weights_id", 7), r"weights_id must be a string, got 7"),
    (_set("num_layers", "2"), r"num_layers must be a positive integer, got '2'"),
    (_set("attention_head_dim", 0), r"attention_head_dim must be a positive integer, got 0"),
    (_set("norm_eps", "1e-5"), r"norm_eps must be a positive number, got '1e-5'"),
    (_set("shared_embedder", "yes"), r"shared_embedder must be true or false, got 'yes'"),
    (_set("stages", 0, "t_start", "zero"), r"stages\[0\]\.t_start must be an integer, got 'zero'"),
    (_set("stages", 1, "t_end", 999.5), r"stages\[1\]\.t_end must be an integer, got 999\.5"),
    (_set("stages", 0, "name", None), r"stages\[0\]\.name must be a string, got None"),
    (_set("stages", 0, "sparsity", "half"), r"stages\[0\]\.sparsity must be a number, got 'half'"),
    (_set("stages", 0, "blocks", []), r"stages\[0\]\.blocks must be a list of 2 blocks \(num_layers\)"),
    (_set("stages", 1, "blocks", 0, "kept_heads", ["1"]),
     r"stages\[1\]\.blocks\[0\]\.kept_heads must be a list of integers, got \['1'\]"),
    (_set("stages", 0, "blocks", 1, "kept_heads", [9]),
     r"stage 'late' block 1: kept_heads must lie in \[0, 4\), got \[9, 9\]"),
    (_set("sample_size", "big"), r"sample_size must be a positive integer, got 'big'"),
])
def test_invalid_config_is_one_clear_error_naming_the_file(saved, edit, match):
    _edit_config(saved, edit)
    before = _listing(saved)
    with pytest.raises(ValueError, match=r"MosaicDiT\.from_pretrained: .*config\.json: " + match):
        MosaicDiT.from_pretrained(saved)
    assert _listing(saved) == before


@pytest.mark.parametrize("key", ["format_version", "dtype", "stages", "shared_embedder", "dense_reference",
                                 "num_layers", "num_attention_heads", "sample_size"])
def test_missing_config_key(saved, key):
    _edit_config(saved, lambda c: c.pop(key))
    with pytest.raises(ValueError, match=rf"config\.json lacks the key '{key}'"):
        MosaicDiT.from_pretrained(saved)


def test_config_that_is_not_an_object(saved):
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json has format 'list', expected"):
        MosaicDiT.from_pretrained(saved)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["stages"][0].__setitem__("t_end", 300), r"stages 'late' \[0, 300\) and 'early' \[400, 1000\) leave a gap"),
    (lambda c: c["stages"][0].__setitem__("t_end", 500), r"stages 'late' \[0, 500\) and 'early' \[400, 1000\) overlap"),
    (lambda c: c["stages"][0].__setitem__("t_start", 100), r"stage 'late' starts at t=100, so t in \[0, 100\) has no stage"),
    (lambda c: c["stages"][1].__setitem__("t_end", 900), r"the last stage 'early' ends at t=900, not at 1000"),
    (lambda c: c["meta"].__setitem__("num_train_timesteps", 500), r"the last stage 'early' ends at t=1000, not at 500"),
], ids=["gap", "overlap", "starts-late", "ends-early", "meta-T"])
def test_stages_must_cover_every_timestep(saved, edit, match):
    # Before: "ends-early" loaded, and sampling failed at its first step above t=900.
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=r"config\.json: " + match + r".*cover \[0, \d+\) without gaps"):
        MosaicDiT.from_pretrained(saved)


@pytest.mark.parametrize("name, dtype", [
    ("float16", torch.float16), ("fp16", torch.float16), ("bfloat16", torch.bfloat16),
    ("bf16", torch.bfloat16), ("float32", torch.float32), ("fp32", torch.float32), ("torch.float16", torch.float16),
])
def test_torch_dtype_by_name(saved, name, dtype):
    assert MosaicDiT.from_pretrained(saved, torch_dtype=name).dtype == dtype


@pytest.mark.parametrize("bad", ["float8", "half ", torch.int64, 16])
def test_invalid_torch_dtype_lists_the_valid_ones(saved, bad):
    with pytest.raises(TypeError, match=r"torch_dtype must be a floating torch\.dtype or one of 'float16', 'fp16', "
                                        r"'bfloat16', 'bf16', 'float32', 'fp32', got "):
        MosaicDiT.from_pretrained(saved, torch_dtype=bad)


def test_invalid_device(saved, monkeypatch):
    with pytest.raises(ValueError, match=r"device 'gpu' is not a torch device; use 'cpu', 'cuda'"):
        MosaicDiT.from_pretrained(saved, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device 'cuda' requested, but no CUDA device is available"):
        MosaicDiT.from_pretrained(saved, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"device 'cuda:3' requested, but only 1 CUDA device"):
        MosaicDiT.from_pretrained(saved, device="cuda:3")


def test_weights_that_are_not_safetensors(saved):
    (saved / "model.safetensors").write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt \(.*\); save the mosaic again"):
        MosaicDiT.from_pretrained(saved)


def test_weights_of_another_save_are_refused(saved, tmp_path):
    # Same shapes, other values: without the pairing id this would load silently.
    other = tmp_path / "other"
    _mosaic(identical=False).save_pretrained(other)
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"model\.safetensors is not the weights .*config\.json was saved with"):
        MosaicDiT.from_pretrained(saved)


def test_saved_mosaic_in_dit_pipeline(tmp_path):
    """The untested path: a mosaic loaded from disk drives diffusers' DiTPipeline unchanged."""
    from tests.runtime.test_mosaic import _pipe, _sample, _tiny_vae

    dense = tiny_dit(num_classes=1000)  # DiTPipeline's null class is 1000
    mosaic = MosaicDiT.from_dense(dense, two_stage_specs(dense))
    mosaic.save_pretrained(tmp_path / "m")
    vae = _tiny_vae()
    want = _sample(_pipe(mosaic, vae))
    loaded = MosaicDiT.from_pretrained(tmp_path / "m")
    seen = []
    loaded.on_stage_change = lambda i, name: seen.append(name)
    got = _sample(_pipe(loaded, vae))
    assert got.shape == (2, 3, 16, 16) and torch.isfinite(got).all()
    assert torch.equal(got, want) and seen == ["early", "late"]


# ------------------------------------------------------------------ folders of earlier versions

LEGACY = Path(__file__).parent / "data" / "mosaic_format_1_1"


def test_format_1_1_folder_still_loads(tmp_path):
    """A folder written by mosaicdiff 0.1 (format 1.1: dense_config/runtime, "stages.i.blocks.j.*"
    keys) loads and computes what that version computed (its outputs were saved with it)."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(LEGACY, folder)
    assert json.loads((folder / "config.json").read_text())["format_version"] == "1.1"
    loaded = MosaicDiT.from_pretrained(folder)
    x, labels = inputs(batch=2)
    with torch.no_grad():
        got = torch.cat([loaded(x, timestep=t, class_labels=labels).sample for t in (10, 700)])
    want = load_file(LEGACY.parent / "mosaic_format_1_1_outputs.safetensors")["out"]
    assert torch.equal(got, want), f"differs by {(got - want).abs().max()}"
    assert loaded.meta == {"method": "manual-slice", "seed": 0} and loaded.stage_names == ["late", "early"]
    # the pairing id of 1.1 is still checked, and a re-save writes the current format
    other = tmp_path / "other"
    _mosaic().save_pretrained(other)
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"is not the weights .*config\.json was saved with"):
        MosaicDiT.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["format_version"] == MosaicDiT.format_version


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("runtime"), r"config\.json lacks the key 'runtime'"),
    (_set("dense_config", None), r"config\.json: dense_config must be an object, got None"),
    (_set("runtime", "x"), r"config\.json: runtime must be an object, got 'x'"),
    (_set("dense_config", "sample_size", "big"), r"config\.json: sample_size must be a positive integer, got 'big'"),
])
def test_format_1_1_config_errors_name_the_legacy_field(tmp_path, edit, match):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(LEGACY, folder)
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=match):
        MosaicDiT.from_pretrained(folder)


def test_a_diffusers_model(saved):
    """dtype/device/config come from diffusers' ModelMixin/ConfigMixin; pipeline loading options work."""
    from diffusers import ConfigMixin, ModelMixin

    loaded = MosaicDiT.from_pretrained(saved.parent, subfolder=saved.name, low_cpu_mem_usage=True, variant=None)
    assert isinstance(loaded, ModelMixin) and isinstance(loaded, ConfigMixin)
    assert type(loaded).dtype is ModelMixin.dtype and type(loaded).device is ModelMixin.device
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu" and loaded.num_stages == 2
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['tourch_dtype'\]"):
        MosaicDiT.from_pretrained(saved, tourch_dtype=torch.float16)

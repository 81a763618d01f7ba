"""A saved (or constructor) config with a field of the wrong type or value: one ValueError naming the
field and the file, from the loader's checks, not an UnboundLocalError, a negative tensor dimension
or a NotImplementedError from deep inside diffusers' build. (Weights of another dtype than the
config's, int32 included: `tests/families/conformance.py`, for every family.)"""

from __future__ import annotations

import json
import re
import shutil

import pytest

import mosaicdiff
from mosaicdiff.families.dit import testing as dit_testing
from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.families.unet import testing as unet_testing
from mosaicdiff.families.unet.model import MosaicUNet

FAMILIES = {"dit": (MosaicDiT, dit_testing), "unet": (MosaicUNet, unet_testing)}

#: (family, edit of config.json, the start of the message after "<file>: ")
BAD_FIELDS = [
    ("dit", {"activation_fn": "relu"}, "activation_fn must be 'gelu-approximate'"),
    ("dit", {"num_embeds_ada_norm": -5}, "num_embeds_ada_norm must be a positive integer"),
    ("dit", {"norm_type": "layer_norm"}, "norm_type must be 'ada_norm_zero'"),
    ("dit", {"norm_elementwise_affine": True}, "norm_elementwise_affine must be False"),
    ("dit", {"sample_size": 0}, "sample_size must be a positive integer"),
    ("dit", {"out_channels": -1}, "out_channels must be null or a positive integer"),
    ("dit", {"norm_eps": -1.0}, "norm_eps must be a positive number"),
    ("unet", {"block_out_channels": [-32, 64]}, "block_out_channels must be a positive integer or a list"),
    ("unet", {"cross_attention_dim": -4}, "cross_attention_dim must be a positive integer or a list"),
    ("unet", {"norm_num_groups": 0}, "norm_num_groups must be null or a positive integer"),
    ("unet", {"stages": ["ab"]}, r"stages\[0\] must be an object"),
    # a field diffusers checks: whatever its build raises, said in one line
    ("unet", {"down_block_types": ["Bogus", "CrossAttnDownBlock2D"]},
     r"the config does not describe a MosaicUNet \(ValueError: Bogus does not exist\.\)"),
    ("unet", {"norm_num_groups": 7}, r"the config does not describe a MosaicUNet \(ValueError: num_channels \(32\) "
                                     r"must be divisible by num_groups \(7\)\)"),
    ("unet", {"shared_producers": ["x"]}, r"shared_producers\[0\].heads1 must be a list of integers"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for name, (_, testing) in FAMILIES.items():
        mosaicdiff.prune(testing.tiny_dense(), None, 0.3, method="magnitude", align=None,
                         progress=False).save_pretrained(root / name)
    return root


def _copy(saved, tmp_path, family: str):
    folder = tmp_path / family
    shutil.copytree(saved / family, folder)
    return folder


@pytest.mark.parametrize("family,edit,message", BAD_FIELDS, ids=[f"{f}-{next(iter(e))}" for f, e, _ in BAD_FIELDS])
def test_a_bad_field_is_named(saved, tmp_path, family, edit, message):
    cls = FAMILIES[family][0]
    folder = _copy(saved, tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.from_pretrained: {re.escape(str(folder))}/config\.json: "
                                         rf"{message}") as info:
        cls.from_pretrained(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("stages,message", [
    (["ab"], r"MosaicUNet: stages\[0\] must be an object, got 'ab'"),
    ([{"name": "all"}], r"MosaicUNet: stages\[0\]\.t_start must be an integer, got None"),
    ("kept_heads1=[99]", r"stage 'all' block 0: kept_heads1 must be distinct indices in \[0, 4\), got \[99\]"),
    ("kept_heads1=[0, 0]", r"stage 'all' block 0: kept_heads1 must be distinct indices in \[0, 4\), got \[0, 0\]"),
])
def test_the_unet_constructor_names_a_bad_stage(stages, message):
    dense = unet_testing.tiny_dense()
    if isinstance(stages, str):
        kept = json.loads(stages.split("=")[1])
        stages = [{"name": "all", "t_start": 0, "t_end": 1000, "sparsity": 0.0,
                   "blocks": [{"kept_heads1": kept, "kept_heads2": [0], "kept_channels": [0]}] * 12}]
    with pytest.raises(ValueError, match=f"^{message}"):
        MosaicUNet(dict(dense.config), stages=stages)

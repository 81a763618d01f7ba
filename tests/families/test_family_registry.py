"""The family registry: one line per family in the package, `register_family` for plug-ins."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mosaicdiff import families
from mosaicdiff.core.family import Family


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    return families.FAMILIES


def test_registering_a_family_of_the_same_name_replaces_it(registry):
    dit = next(f for f in registry if f.name == "dit")
    before = len(registry)
    replacement = dataclasses.replace(dit, dense_classes="a replacement")
    assert families.register_family(replacement) is replacement
    assert len(registry) == before and [f.name for f in registry].count("dit") == 1
    assert next(f for f in registry if f.name == "dit").dense_classes == "a replacement"


def test_register_family_refuses_what_is_not_a_family(registry):
    with pytest.raises(TypeError, match="Family"):
        families.register_family(("dit", "not a record"))


def test_an_unknown_model_names_the_supported_families():
    with pytest.raises(ValueError, match=r"no model adapter for this model; supported: .*DiTTransformer2DModel.*"
                                         r"UNet2DConditionModel.*got Linear"):
        families.family_for(torch.nn.Linear(2, 2))


def test_every_registered_family_is_complete():
    for family in families.FAMILIES:
        assert isinstance(family, Family) and family.name and family.testing
        module = family.testing_module()
        assert all(callable(getattr(module, f)) for f in ("tiny_dense", "tiny_calibration", "tiny_inputs", "call"))
        assert family.mosaic_class.format_name.endswith(family.mosaic_class.__name__)

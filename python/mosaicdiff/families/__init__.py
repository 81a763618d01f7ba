"""The registry of model families: the one table `mosaicdiff.prune` reads.

A family is one folder, ``mosaicdiff/families/<name>/``, whose ``__init__`` defines ``FAMILY``
(a `mosaicdiff.core.family.Family`: its adapter, its mosaic class, the dense classes it serves),
plus one line in `FAMILIES` below (docs/adding_a_model.md; `tests/test_imports.py` reads
``import_module("...")`` with a literal name as an import). A family defined outside the package
(a plug-in, a test) joins with `register_family`.
"""

from __future__ import annotations

from importlib import import_module

from torch import nn

from mosaicdiff.core.adapter import ModelAdapter, unwrap_model
from mosaicdiff.core.family import Family

__all__ = ["FAMILIES", "Family", "adapter_for", "family_for", "register_family"]

FAMILIES: list[Family] = [
    import_module("mosaicdiff.families.dit").FAMILY,
    import_module("mosaicdiff.families.unet").FAMILY,
    import_module("mosaicdiff.families.pixart").FAMILY,
    import_module("mosaicdiff.families.sd3").FAMILY,
    import_module("mosaicdiff.families.flux").FAMILY,
]


def register_family(family: Family) -> Family:
    """Add `family` to the registry (first match wins; a family of the same name is replaced)."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family expects a mosaicdiff.core.family.Family, got {type(family).__name__}")
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]
    return family


def family_for(model: nn.Module) -> Family:
    """The family of `model` (a ``torch.compile`` wrapper is looked through).

    Raises:
        ValueError: one line naming the model's class and the supported ones.
    """
    inner = unwrap_model(model)
    for family in FAMILIES:
        if family.adapter.handles(inner):
            return family
    supported = ", ".join(f.dense_classes for f in FAMILIES)
    raise ValueError(f"mosaicdiff.prune: no model adapter for this model; supported: {supported}; "
                     f"got {type(inner).__name__} (see docs/adding_a_model.md to add one)")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The `ModelAdapter` of `model` (see `family_for`)."""
    return family_for(model).adapter

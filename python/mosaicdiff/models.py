"""Which adapter and which mosaic class serve a model: the one table `mosaicdiff.prune` reads.

A model family is registered by one line in `FAMILIES` (see docs/adding_a_model.md): its
`mosaicdiff.integrations.base.ModelAdapter` and the runtime class its stages are built into
(``from_dense(dense, stages, source=..., meta=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mosaicdiff.integrations.base import ModelAdapter, unwrap_model
from mosaicdiff.integrations.diffusers_dit import DIT
from mosaicdiff.integrations.diffusers_unet import UNET
from mosaicdiff.mosaic import MosaicDiT
from mosaicdiff.mosaic_unet import MosaicUNet

__all__ = ["FAMILIES", "ModelFamily", "adapter_for", "family_for"]


@dataclass(frozen=True)
class ModelFamily:
    """A model family: what the method asks (`adapter`) and what the runtime builds (`mosaic_class`)."""

    adapter: ModelAdapter
    mosaic_class: type
    #: The dense model classes of the family, as users know them (for the refusal message).
    dense_classes: str


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(DIT, MosaicDiT, "diffusers DiTTransformer2DModel"),
    ModelFamily(UNET, MosaicUNet, "diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL)"),
)


def family_for(model: nn.Module) -> ModelFamily:
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

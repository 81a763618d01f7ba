"""The record that makes a model family known to MosaicDiff (`mosaicdiff.families` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from mosaicdiff.core.adapter import ModelAdapter

__all__ = ["Family"]


@dataclass(frozen=True)
class Family:
    """A model family: what the method asks (`adapter`) and what the runtime builds (`mosaic_class`).

    Attributes:
        name: short name (``"dit"``, ``"unet"``): registry key, logs.
        dense_classes: the dense model classes of the family as users know them (for messages).
        adapter: the family's `ModelAdapter` (one instance serves every model of the family).
        mosaic_class: the stage-switching model class (``from_dense(dense, stages, source=...,
            meta=..., share_producers=...)``), a `mosaicdiff.core.model.MosaicModel`.
        testing: the module with the family's tiny test model (``tiny_dense``,
            ``tiny_calibration``, ``tiny_inputs``, ``call``), which the conformance suite
            (``tests/families``) runs every family through; imported only by tests.
    """

    name: str
    dense_classes: str
    adapter: ModelAdapter
    mosaic_class: type
    testing: str | None = None

    def testing_module(self):
        """The imported `testing` module (ValueError when the family has none)."""
        if not self.testing:
            raise ValueError(f"family {self.name!r} has no testing module")
        import importlib

        return importlib.import_module(self.testing)

"""diffusers' ``DiTTransformer2DModel`` (DiT-XL/2): class-conditional adaLN-Zero transformer."""

from mosaicdiff.core.family import Family
from mosaicdiff.families.dit.adapter import DIT
from mosaicdiff.families.dit.model import MosaicDiT

FAMILY = Family("dit", "diffusers DiTTransformer2DModel", DIT, MosaicDiT, "mosaicdiff.families.dit.testing")

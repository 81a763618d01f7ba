"""diffusers' ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5): a joint-attention MMDiT."""

from mosaicdiff.core.family import Family
from mosaicdiff.families.sd3.adapter import SD3
from mosaicdiff.families.sd3.model import MosaicSD3

FAMILY = Family("sd3", "diffusers SD3Transformer2DModel (SD3, SD3.5)", SD3, MosaicSD3,
                "mosaicdiff.families.sd3.testing")

"""diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha, PixArt-Sigma): text-to-image adaLN-single DiT."""

from mosaicdiff.core.family import Family
from mosaicdiff.families.pixart.adapter import PIXART
from mosaicdiff.families.pixart.model import MosaicPixArt

FAMILY = Family("pixart", "diffusers PixArtTransformer2DModel (PixArt-alpha, PixArt-Sigma)", PIXART, MosaicPixArt,
                "mosaicdiff.families.pixart.testing")

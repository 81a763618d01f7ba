"""diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev / schnell): double- and single-stream MMDiT blocks."""

from mosaicdiff.core.family import Family
from mosaicdiff.families.flux.adapter import FLUX
from mosaicdiff.families.flux.model import MosaicFlux

FAMILY = Family("flux", "diffusers FluxTransformer2DModel (FLUX.1)", FLUX, MosaicFlux, "mosaicdiff.families.flux.testing")

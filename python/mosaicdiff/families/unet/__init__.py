"""diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL): its transformer blocks are pruned."""

from mosaicdiff.core.family import Family
from mosaicdiff.families.unet.adapter import UNET
from mosaicdiff.families.unet.model import MosaicUNet

FAMILY = Family("unet", "diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL)", UNET, MosaicUNet,
                "mosaicdiff.families.unet.testing")

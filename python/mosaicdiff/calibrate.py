"""The calibration data `mosaicdiff.prune` takes (public names; defined in `mosaicdiff.method.calibrate`).

`ConditionedCalibration(latents, conditions, null_conditions=None, cfg=True)` serves every model
family: clean latents and the dense model's forward keyword arguments (tensors with one row per
latent are split with the latents; the rest, or values wrapped in `Shared`, is passed unchanged).
`Calibration` (class labels: DiT) and `TextCalibration` (prompt embeddings: SD / SDXL U-Nets)
build it from the usual inputs.
"""

from mosaicdiff.method.calibrate import Calibration, ConditionedCalibration, Shared
from mosaicdiff.method.text_calibration import TextCalibration

__all__ = ["Calibration", "ConditionedCalibration", "Shared", "TextCalibration"]

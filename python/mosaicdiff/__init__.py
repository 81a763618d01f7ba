"""MosaicDiff: training-free, stage-wise structural pruning for diffusion transformers.

The public API is imported lazily so that `import mosaicdiff` stays cheap (no diffusers import).

Examples:
    >>> import mosaicdiff
    >>> from mosaicdiff.zoo import load_digits_dit
    >>> from mosaicdiff.calibrate import Calibration
    >>> from mosaicdiff.zoo.data import load_digits_tensors
    >>> dense = load_digits_dit()
    >>> x0, labels = load_digits_tensors()
    >>> mosaic = mosaicdiff.prune(dense, Calibration(x0, labels, null_class=10), target_sparsity=0.5)
    >>> images = mosaicdiff.sample(mosaic, labels[:8], num_inference_steps=50)

``mosaicdiff.prune`` is the function; its module is `mosaicdiff.api` (a submodule named like a
package attribute would replace that attribute when first imported).

Layout (one concept a folder; imports run down this list only, `tests/test_imports.py`):
``app``, ``search``, ``eval`` -> ``api`` -> ``families/<name>`` -> ``method`` -> ``core`` ->
``mosaic_kernels``.
"""

from mosaicdiff._version import __version__

_LAZY = {
    "prune": ("mosaicdiff.api", "prune"),
    "MosaicDiT": ("mosaicdiff.families.dit.model", "MosaicDiT"),
    "MosaicUNet": ("mosaicdiff.families.unet.model", "MosaicUNet"),
    "MosaicPixArt": ("mosaicdiff.families.pixart.model", "MosaicPixArt"),
    "Calibration": ("mosaicdiff.calibrate", "Calibration"),
    "ConditionedCalibration": ("mosaicdiff.calibrate", "ConditionedCalibration"),
    "TextCalibration": ("mosaicdiff.calibrate", "TextCalibration"),
    "sample": ("mosaicdiff.core.sampling", "sample"),
    "quantize": ("mosaicdiff.core.quantize", "quantize"),
    "stage_boundaries": ("mosaicdiff.method.schedule", "stage_boundaries"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mosaicdiff' has no attribute {name!r}")

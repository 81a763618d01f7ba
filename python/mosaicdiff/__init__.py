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

``mosaicdiff.prune`` is both the submodule (``from mosaicdiff.prune import prune_stages``,
``import mosaicdiff.prune as m``) and, called, the function ``mosaicdiff.prune.prune``: the
import system binds the submodule to the package attribute of the same name, so the submodule
is made callable whenever that happens (see `_Package`) instead of the function being replaced
by a module after the first import.
"""

# Private names only: the import system binds each submodule (e.g. `mosaicdiff.types`) to a
# package attribute of the same name, which would replace a plain `import types` here.
import sys as _sys
from types import ModuleType as _ModuleType

from mosaicdiff._version import __version__

_LAZY = {
    "MosaicDiT": ("mosaicdiff.mosaic", "MosaicDiT"),
    "Calibration": ("mosaicdiff.calibrate", "Calibration"),
    "sample": ("mosaicdiff.sampling", "sample"),
    "stage_boundaries": ("mosaicdiff.schedule", "stage_boundaries"),
}
#: Submodules that share their name with the function they define, and are callable as it.
_CALLABLE_SUBMODULES = ("prune",)

__all__ = ["__version__", *_CALLABLE_SUBMODULES, *_LAZY]


class _CallableModule(_ModuleType):
    """A submodule that, called, calls its function of the same name (looked up at call time)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(getattr(self, self.__name__.rpartition(".")[2]))


class _Package(_ModuleType):
    """The `mosaicdiff` package: makes ``mosaicdiff.prune`` callable when the import binds it."""

    def __setattr__(self, name, value):
        if name in _CALLABLE_SUBMODULES and type(value) is _ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
for _name in _CALLABLE_SUBMODULES:  # already imported (this package reloaded): bind it again
    if f"{__name__}.{_name}" in _sys.modules:
        setattr(_sys.modules[__name__], _name, _sys.modules[f"{__name__}.{_name}"])
del _name


def __getattr__(name):
    if name in _CALLABLE_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # binds the callable submodule
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mosaicdiff' has no attribute {name!r}")

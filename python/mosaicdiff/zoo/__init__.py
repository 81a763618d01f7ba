"""The embedded small real models, shipped with the package and loaded offline.

- `load_digits_dit()`: a class-conditional DiT (diffusers `DiTTransformer2DModel`, 6 blocks, 6 heads
  of 32, patch 4, 16x16x1 pixels, 10 classes + null class 10 for classifier-free guidance) trained
  here on the scikit-learn digits (see `zoo.train_dit`).
- `load_digits_classifier()`: a small CNN on the same images (see `zoo.classifier`), used as the
  feature extractor for FID and for class accuracy (`mosaicdiff.quality`).
"""

from __future__ import annotations

from pathlib import Path

import torch

ZOO_DIR = Path(__file__).resolve().parent
DIGITS_DIT_DIR = ZOO_DIR / "digits_dit"
DIGITS_CLASSIFIER_DIR = ZOO_DIR / "digits_classifier"


def load_digits_dit(device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load the embedded digits DiT from the package directory, offline.

    Args:
        device: where to put the model.
        torch_dtype: optional dtype to load the weights in (default float32).

    Returns:
        A `diffusers.DiTTransformer2DModel` in eval mode.

    Raises:
        FileNotFoundError: if the shipped weights are missing (e.g. a source checkout without them).
    """
    from diffusers import DiTTransformer2DModel

    weights = DIGITS_DIT_DIR / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"embedded digits DiT weights not found at {weights}; reproduce them with "
            f"`python -m mosaicdiff.zoo.train_dit --out {DIGITS_DIT_DIR}`")
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    model = DiTTransformer2DModel.from_pretrained(str(DIGITS_DIT_DIR), **kwargs)
    return model.to(device).eval()


def load_digits_classifier(device: str | torch.device = "cpu"):
    """Load the embedded digits classifier (`zoo.classifier.DigitsClassifier`, eval mode).

    Raises:
        FileNotFoundError: if the shipped weights are missing.
    """
    from mosaicdiff.zoo.classifier import load

    return load(DIGITS_CLASSIFIER_DIR, device)


__all__ = ["load_digits_dit", "load_digits_classifier", "DIGITS_DIT_DIR", "DIGITS_CLASSIFIER_DIR"]

"""Real image data that ships with scikit-learn: the UCI handwritten digits.

1797 grayscale 8x8 images in 10 classes, read offline from scikit-learn's package data.
The embedded DiT and the digits classifier are trained on them, and FID is measured against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits_tensors(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the digits as float images in [-1, 1].

    Args:
        size: output side length; the 8x8 originals are upsampled bilinearly.

    Returns:
        images: `(1797, 1, size, size)` float32 in [-1, 1]; labels: `(1797,)` int64 in 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


def train_test_split(n: int, test_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random split of indices 0..n-1 into (train, test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]

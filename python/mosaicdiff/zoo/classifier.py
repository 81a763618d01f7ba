"""A small CNN classifier for the 16x16 digits: the feature extractor behind FID and class accuracy.

Reproduce the shipped weights with::

    python -m mosaicdiff.zoo.classifier --out python/mosaicdiff/zoo/digits_classifier --threads 1

Recipe (the shipped weights used exactly these defaults, seed 0): the train split of
`zoo.data.train_test_split` (1617 images; the 180 test images are never seen), random shifts of up
to 1 pixel and light Gaussian pixel noise as augmentation, AdamW lr 2e-3 with cosine decay,
batch 64, 30 epochs. The held-out accuracy and training time are written to `config.json`
(`"training"`); the shipped weights' numbers are in docs/results.md ("The embedded models").

The penultimate layer (`feature_dim` = 64 post-ReLU activations) is the feature space of
`mosaicdiff.eval.quality.fid`, playing the role Inception-v3's pool features play for ImageNet FID.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mosaicdiff.zoo.data import IMAGE_SIZE, NUM_CLASSES, load_digits_tensors, train_test_split

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitsClassifier(nn.Module):
    """Two conv stages (16x16 -> 8x8 -> 4x4), then a `feature_dim` bottleneck and a linear head.

    Args:
        width: channels of the first conv stage (the second has twice as many).
        feature_dim: size of the penultimate (feature) layer.
        num_classes: number of output logits.
        image_size: input side length (the network assumes square 1-channel inputs in [-1, 1]).
    """

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = NUM_CLASSES,
                 image_size: int = IMAGE_SIZE):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"DigitsClassifier: image_size must be a multiple of 4, got {image_size}")
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes,
                           image_size=image_size)
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * w * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            x: `(N, 1, H, W)` images in [-1, 1].

        Returns:
            `(N, feature_dim)` float tensor (post-ReLU).

        Raises:
            ValueError: if `x` is not `(N, 1, image_size, image_size)`.
        """
        s = self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"DigitsClassifier: expected images (N, 1, {s}, {s}), got {tuple(x.shape)}")
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits `(N, num_classes)` for images `(N, 1, H, W)` in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1, noise_std: float = 0.05) -> torch.Tensor:
    """Random integer shifts (zero-padded with the background value -1) and light pixel noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    out = padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    out = out + noise_std * torch.randn(out.shape, generator=generator)
    return out.clamp(-1, 1)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` whose argmax logit equals `labels`."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / max(len(images), 1)


def train(epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
          progress: bool = True) -> tuple[DigitsClassifier, dict]:
    """Train a classifier on the digits train split.

    Args:
        epochs: passes over the 1617 training images.
        batch_size: minibatch size.
        lr: peak AdamW learning rate (cosine decay to 0).
        seed: seeds initialisation, shuffling and augmentation.
        progress: show a tqdm bar over epochs.

    Returns:
        The trained model (eval mode) and a dict of training facts (held-out accuracy, seconds, recipe).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images, labels = load_digits_tensors()
    train_idx, test_idx = train_test_split(len(images))
    x_tr, y_tr = images[train_idx], labels[train_idx]
    model = DigitsClassifier()
    logger.info("training %s", model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="train digits classifier", disable=not progress):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(augment(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    seconds = time.time() - t0
    model.eval()
    info = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "train_accuracy": accuracy(model, x_tr, y_tr),
        "test_accuracy": accuracy(model, images[test_idx], labels[test_idx]),
        "num_train": len(x_tr), "num_test": len(test_idx), "torch": torch.__version__,
    }
    return model, info


def save(model: DigitsClassifier, out: Path, training: dict | None = None) -> None:
    """Write `config.json` and `model.safetensors` to `out` (created if missing), each atomically."""
    from safetensors.torch import save

    from mosaicdiff.core.atomic_io import write_bytes_atomic, write_json_atomic

    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(out / WEIGHTS_NAME, save(state))
    cfg = dict(model.config)
    if training is not None:
        cfg["training"] = training
    write_json_atomic(out / CONFIG_NAME, cfg, indent=2)


def load(path: Path, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load a classifier saved by `save`.

    Raises:
        FileNotFoundError: if `config.json` or `model.safetensors` is missing in `path`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"digits classifier: {path / name} not found; train it with "
                                    f"`python -m mosaicdiff.zoo.classifier --out {path}`")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    model = DigitsClassifier(**{k: cfg[k] for k in ("width", "feature_dim", "num_classes", "image_size")})
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    return model.to(device).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the digits classifier used for FID and class accuracy.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest when other jobs share the cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = train(args.epochs, args.batch_size, args.lr, args.seed)
    save(model, args.out, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

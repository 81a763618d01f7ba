"""The toy family's tiny test model (the four functions every family's ``testing`` module has)."""

import torch

from mosaicdiff.method.calibrate import Calibration
from toyfam.dense import ToyDenoiser


def tiny_dense(seed: int = 0):
    torch.manual_seed(seed)
    return ToyDenoiser().eval()


def tiny_calibration(dense, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, 4, 8, 8, generator=g), torch.arange(n) % 10, null_class=10)


def tiny_inputs(dense, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), {"class_labels": torch.randint(0, 11, (batch,), generator=g)}


@torch.no_grad()
def call(model, x, t, conditions):
    return model(x, t, **conditions, return_dict=False)[0]

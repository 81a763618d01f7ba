"""Sharded sampling of N images (FID-50K) into one ``.npz`` for the ADM evaluation suite.

``sample_to_npz(model, out_dir, N)`` works in one process and under ``torchrun`` alike:

- **Image i is a pure function of (seed, i)**: its class is ``labels[i % len(labels)]`` (default
  ``i % num_classes``: class-balanced), its initial noise comes from a generator seeded with
  `image_seed` ``(seed, i)``, and it is sampled in the batch ``[start + j*b, start + (j+1)*b)``
  of its shard. None of that depends on the number of ranks, so every world size gives the same
  N images (bitwise on the same hardware and thread count). The deterministic DDIM sampler
  (`mosaicdiff.core.sampling.default_scheduler`) draws no noise after the initial one.
- **Shards**: images ``[k*S, (k+1)*S)`` (``S`` = `shard_size`) form shard k (`shard_ranges`, computed
  lazily: any N costs no memory before it is checked). The shards still missing are dealt out
  round-robin to the ranks, so a rerun after a crash (any world size) samples only those. The
  folder (shard files named with their sha256, ``shards/manifest.json`` with the settings, the
  lock, the assembly) is kept by `mosaicdiff.core.sample_shards`: a folder of other settings is
  refused rather than mixed, a finished ``samples.npz`` is never replaced by other settings, and a
  second run into a busy folder fails at once.
- **Checked first**: every argument, the output names and the free disk (the output size,
  ``N * H * W * 3`` bytes for ``samples.npz`` and as much for the shards, is known up front)
  before anything is written; images that became NaN/inf fail the run, naming the sampling step,
  instead of being saved black.
- **Assembly**: after a barrier, rank 0 streams the shards into ``out_dir/samples.npz`` with the
  one key ``arr_0``: uint8 ``(N, H, W, 3)``, the layout the ADM evaluator (openai's
  guided-diffusion evaluation suite) reads and DiT's DDP sampling script writes.

Pixels: images in [-1, 1] become ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8 (DiT's
DDP sampling script's convention). Grayscale images are written with C = 3 (the channel repeated):
the evaluator's Inception network takes RGB, and a C = 1 array would fail there. Latent models
(DiT-XL/2) are decoded by a diffusers VAE: ``vae.decode(z / vae.config.scaling_factor)``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mosaicdiff.core import distributed, sample_shards, sampling
from mosaicdiff.core.sample_shards import check_output_dir

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SHARD_SIZE", "ShardRanges", "check_output_dir", "image_labels",
           "image_noise", "image_seed", "sample_to_npz", "shard_ranges", "to_uint8_nhwc"]

DEFAULT_SHARD_SIZE = 1000  # 50 shards for FID-50K: a crash costs at most one shard per rank
DEFAULT_BATCH_SIZE = 50
_FORMAT = "mosaicdiff-sharded-samples/2"  # 2: shards named with their sha256


# ----------------------------------------------------------------------------- what image i is

def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image `index`'s noise: a hash of ``(seed, index)`` (no collisions between
    nearby seeds, unlike ``seed * k + index``)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(1, np.uint64)
    return int(state[0])


def image_noise(model: nn.Module, seed: int, start: int, end: int) -> torch.Tensor:
    """The initial noise of images ``start .. end-1`` (CPU float32): one generator per image."""
    return torch.cat([sampling.make_noise(model, 1, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                      for i in range(start, end)])


def image_labels(start: int, end: int, num_classes: int, labels: Sequence[int] | None = None) -> torch.Tensor:
    """The class ids of images ``start .. end-1``: ``labels[i % len(labels)]``, default ``i % num_classes``."""
    index = torch.arange(start, end)
    if labels is None:
        return index % int(num_classes)
    return torch.as_tensor(list(labels), dtype=torch.long)[index % len(labels)]


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` images in [-1, 1] -> uint8 ``(B, H, W, 3)`` (DiT's rounding; gray repeated to RGB).

    Raises:
        ValueError: not ``(B, 1 or 3, H, W)``, or NaN/inf pixels (they would become black).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("to_uint8_nhwc: the images contain NaN/inf")
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class ShardRanges(Sequence):
    """The image ranges ``[start, end)`` of the shards (the last may be shorter), computed on access:
    ``len`` and indexing in O(1) memory for any N."""

    def __init__(self, num_images: int, shard_size: int):
        self.num_images, self.shard_size = int(num_images), int(shard_size)

    def __len__(self) -> int:
        return (self.num_images + self.shard_size - 1) // self.shard_size

    def __getitem__(self, k: int) -> tuple[int, int]:
        if not isinstance(k, int):
            raise TypeError(f"ShardRanges indices are integers, got {type(k).__name__}")
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"shard {k} of {n}")
        start = (k % n) * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def __repr__(self) -> str:
        return f"ShardRanges(num_images={self.num_images}, shard_size={self.shard_size})"


def shard_ranges(num_images: int, shard_size: int) -> ShardRanges:
    """The image ranges ``[start, end)`` of the shards (the last may be shorter), as a lazy sequence."""
    return ShardRanges(num_images, shard_size)


def _image_size(model: nn.Module, vae: nn.Module | None) -> int:
    size = int(_config(model, "sample_size"))
    if vae is None:
        return size
    return size * 2 ** (len(vae.config.block_out_channels) - 1)  # as diffusers' vae_scale_factor


# ----------------------------------------------------------------------------- checks before any work

def _config(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    return config.get(name) if hasattr(config, "get") else getattr(config, name, None)


def _integer(value) -> int | None:
    """`value` as an int if it is an integer (Python, numpy or 0-d tensor; not a bool or float), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_arguments(model: nn.Module, num_images, shard_size, batch_size, labels, vae: nn.Module | None, seed,
                     num_inference_steps, guidance_scale) -> int:
    """Every argument, before anything is written; returns the number of classes."""
    if any(_config(model, k) is None for k in ("num_embeds_ada_norm", "in_channels", "sample_size")):
        raise TypeError(f"sample_to_npz samples class-conditional DiT models (diffusers DiTTransformer2DModel, "
                        f"MosaicDiT), not a {type(model).__name__} (its config has no num_embeds_ada_norm, "
                        f"in_channels or sample_size); sample a U-Net (UNet2DConditionModel, MosaicUNet) with its "
                        f"diffusers pipeline (unet=the model) or mosaicdiff.core.text_sampling.sample_with_text")
    for name, value in (("num_images", num_images), ("shard_size", shard_size), ("batch_size", batch_size),
                        ("num_inference_steps", num_inference_steps)):
        if _integer(value) is None or value < 1:
            raise ValueError(f"sample_to_npz: {name} must be a positive integer, got {value!r}")
    if _integer(seed) is None:
        raise ValueError(f"sample_to_npz: seed must be an integer, got {seed!r}")
    sampling.check_guidance_scale(guidance_scale, "sample_to_npz")
    num_classes = int(_config(model, "num_embeds_ada_norm"))
    if labels is not None:
        labels = list(labels)
        if not labels or any(_integer(v) is None or not 0 <= v < num_classes for v in labels):
            raise ValueError(f"sample_to_npz: labels must be class ids in [0, {num_classes}), got {labels[:16]}")
    channels = int(_config(model, "in_channels"))
    if vae is None and channels not in (1, 3):
        raise ValueError(f"the model samples {channels}-channel latents, not images: give the VAE that decodes "
                         f"them (vae=AutoencoderKL, `--vae PATH`)")
    if vae is not None and int(vae.config.latent_channels) != channels:
        raise ValueError(f"the VAE decodes {vae.config.latent_channels}-channel latents but the model samples "
                         f"{channels} channels; give the VAE the model was trained with")
    return num_classes


# ----------------------------------------------------------------------------- sampling

def _decode(vae: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: pixels as they are, latents through the VAE."""
    if vae is None:
        return x
    param = next(vae.parameters())
    with torch.no_grad():
        images = vae.decode(x.to(param.device, param.dtype) / float(vae.config.scaling_factor)).sample
    if not bool(torch.isfinite(images).all()):  # clamp would turn NaN into black pixels
        raise sampling.NonFiniteError("the VAE decoded NaN/inf from finite latents; check the VAE's weights (a "
                                      "float16 VAE may overflow: use float32)")
    return images.float().clamp(-1, 1).cpu()


def _sample_shard(model: nn.Module, vae: nn.Module | None, start: int, end: int, size: int, options: dict,
                  bar) -> np.ndarray:
    """The uint8 NHWC images ``start .. end-1``, sampled in batches of ``options["batch_size"]``."""
    chunks = []
    for b in range(start, end, options["batch_size"]):
        stop = min(b + options["batch_size"], end)
        try:
            x = sampling.sample(model, image_labels(b, stop, options["num_classes"], options["labels"]),
                                noise=image_noise(model, options["seed"], b, stop),
                                num_inference_steps=options["num_inference_steps"],
                                guidance_scale=options["guidance_scale"], progress=False, clamp=vae is None)
            chunks.append(to_uint8_nhwc(_decode(vae, x)))
        except sampling.NonFiniteError as exc:  # name the images: they are what a rerun would redo
            message = str(exc).removeprefix("sample: ")
            raise sampling.NonFiniteError(f"sample_to_npz: images {b}-{stop - 1}: {message}", exc.step) from None
        bar.update(stop - b)
    pixels = np.concatenate(chunks)
    if pixels.shape[1:] != (size, size, 3):
        raise RuntimeError(f"decoded images are {pixels.shape[1:]}, expected {(size, size, 3)}")
    return pixels


def sample_to_npz(model: nn.Module, out_dir, num_images: int, *, seed: int = 0, labels: Sequence[int] | None = None,
                  num_inference_steps: int = 50, guidance_scale: float = 1.5, vae: nn.Module | None = None,
                  shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = True) -> Path:
    """Sample `num_images` images into ``out_dir/samples.npz`` (``arr_0``: uint8 NHWC), in shards.

    Under a torch.distributed process group (``torchrun``) this is a collective: every rank
    calls it with the same arguments (checked) and samples its share of the missing shards;
    rank 0 then assembles the file. A rerun with the same arguments samples only the shards
    that are missing or fail their sha256 check (see the module docstring). Nothing is written
    before every argument, the output names and the free disk are checked; a run that fails
    before its first shard (one process) leaves no folder behind.

    Args:
        model (`nn.Module`): a class-conditional DiT-like model (diffusers ``DiTTransformer2DModel``,
            `MosaicDiT`; see `mosaicdiff.core.sampling.sample`) on its device. U-Nets are refused.
        out_dir (`str` or `Path`): output folder (created); holds ``shards/`` and ``samples.npz``.
        num_images (`int`): N, e.g. 50000.
        seed (`int`, *optional*, defaults to 0): with the image index, seeds each image's noise.
        labels (`Sequence[int]`, *optional*): class ids cycled over the images (default
            ``0, 1, ..., num_classes - 1, 0, ...``).
        num_inference_steps (`int`, *optional*, defaults to 50): DDIM steps.
        guidance_scale (`float`, *optional*, defaults to 1.5): classifier-free guidance scale.
        vae (`diffusers.AutoencoderKL`, *optional*): decodes latents; required for latent models.
        shard_size (`int`, *optional*, defaults to `DEFAULT_SHARD_SIZE`): images per shard file.
        batch_size (`int`, *optional*, defaults to `DEFAULT_BATCH_SIZE`): images per sampling batch.
        progress (`bool`, *optional*, defaults to True): a progress bar (rank 0 only).

    Returns:
        `Path` of ``samples.npz`` (on every rank).

    Raises:
        TypeError: a model that is not a class-conditional DiT (e.g. a U-Net).
        ValueError: bad arguments, more ranks than images, ranks launched with different
            arguments or models, a latent model without a VAE, more output than free disk or more
            than `mosaicdiff.core.sample_shards.MAX_SHARDS` shards, an
            `out_dir` holding shards or a ``samples.npz`` of other or unknown settings (an
            unreadable manifest included), or images that became NaN/inf
            (`mosaicdiff.core.sampling.NonFiniteError`, naming the images and the step).
        FileExistsError / IsADirectoryError: `out_dir` or ``shards`` is a file, ``samples.npz`` a folder.
        BlockingIOError: another run into `out_dir` is in progress.
        OSError: a shard failed its sha256 check at assembly (run again: it is sampled anew).
        The errors are raised on every rank.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    num_classes = _check_arguments(model, num_images, shard_size, batch_size, labels, vae, seed, num_inference_steps,
                                   guidance_scale)
    size = _image_size(model, vae)
    options = {"seed": int(seed), "labels": None if labels is None else [int(v) for v in labels],
               "num_classes": num_classes, "num_inference_steps": int(num_inference_steps),
               "guidance_scale": float(guidance_scale), "batch_size": int(batch_size)}
    settings = {
        "format": _FORMAT, "num_images": int(num_images), **options, "shard_size": int(shard_size),
        "image_size": size, "model_sha256": distributed.state_digest(model), "vae_sha256": distributed.state_digest(vae),
    }
    distributed.check_same_across_ranks(settings, "sampling settings")
    world = distributed.world_size()
    if world > num_images:  # after the collective above: every rank raises, none waits
        raise ValueError(f"{world} ranks for {num_images} images: every rank needs at least one image; launch at "
                         f"most {num_images} processes or sample more images")
    ranges = shard_ranges(num_images, shard_size)
    with contextlib.ExitStack() as held:  # rank 0 holds the folder's lock until samples.npz is written
        plan = distributed.run_on_main(lambda: sample_shards.prepare(out_dir, settings, ranges, size, held))
        try:
            rank = distributed.rank()
            if 0 < len(plan.missing) < world and distributed.is_main_process():
                logger.warning("%d shards to sample for %d ranks: %d ranks stay idle (a smaller shard_size spreads "
                               "the work)", len(plan.missing), world, world - len(plan.missing))
            mine = plan.missing[rank::world]
            bar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in mine),
                       desc=f"sampling (rank {rank} of {world})", unit="img",
                       disable=not (progress and distributed.is_main_process()))
            for k in mine:
                start, end = ranges[k]
                sample_shards.write_shard(out_dir, start, end, _sample_shard(model, vae, start, end, size, options, bar))
            bar.close()
            distributed.barrier()
            return distributed.run_on_main(lambda: sample_shards.assemble(out_dir, ranges, size))
        except BaseException:
            if world == 1:  # several ranks may still be writing: only a lone process undoes its start
                sample_shards.undo_fresh_start(out_dir, plan)
            raise

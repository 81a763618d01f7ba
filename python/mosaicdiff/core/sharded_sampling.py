"""Sharded sampling of N images (FID-50K) into one ``.npz`` for the ADM evaluation suite.

``sample_to_npz(model, out_dir, N)`` works in one process and under ``torchrun`` alike:

- **Image i is a pure function of (seed, i)**: its class is ``labels[i % len(labels)]`` (default
  ``i % num_classes``: class-balanced), its initial noise comes from a generator seeded with
  `image_seed` ``(seed, i)``, and it is sampled in the batch ``[start + j*b, start + (j+1)*b)``
  of its shard. None of that depends on the number of ranks, so every world size gives the same
  N images (bitwise on the same hardware and thread count). The deterministic DDIM sampler
  (`mosaicdiff.core.sampling.default_scheduler`) draws no noise after the initial one.
- **Shards**: images ``[k*S, (k+1)*S)`` (``S`` = `shard_size`) form shard k, saved as
  ``out_dir/shards/images-<start>-<end>.npy`` (8-digit image indices, end exclusive), uint8
  NHWC, written atomically (`mosaicdiff.core.atomic_io`). The shards still missing are dealt out
  round-robin to the ranks, so a rerun after a crash (any world size) samples only those.
  ``out_dir/shards/manifest.json`` records the settings; a folder with shards of other
  settings is refused rather than mixed.
- **Assembly**: after a barrier, rank 0 streams the shards into ``out_dir/samples.npz`` with the
  one key ``arr_0``: uint8 ``(N, H, W, 3)``, the layout the ADM evaluator (openai's
  guided-diffusion evaluation suite) reads and DiT's DDP sampling script writes.

Pixels: images in [-1, 1] become ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8 (DiT's
DDP sampling script's convention). Grayscale images are written with C = 3 (the channel repeated):
the evaluator's Inception network takes RGB, and a C = 1 array would fail there. Latent models
(DiT-XL/2) are decoded by a diffusers VAE: ``vae.decode(z / vae.config.scaling_factor)``.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mosaicdiff.core import distributed, sampling
from mosaicdiff.core.atomic_io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SHARD_SIZE", "image_labels", "image_noise", "image_seed",
           "sample_to_npz", "shard_ranges", "to_uint8_nhwc"]

DEFAULT_SHARD_SIZE = 1000  # 50 shards for FID-50K: a crash costs at most one shard per rank
DEFAULT_BATCH_SIZE = 50
SHARDS = "shards"
MANIFEST = "manifest.json"
SAMPLES = "samples.npz"
_FORMAT = "mosaicdiff-sharded-samples/1"


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
    """``(B, C, H, W)`` images in [-1, 1] -> uint8 ``(B, H, W, 3)`` (DiT's rounding; gray repeated to RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """The image ranges ``[start, end)`` of the shards (the last may be shorter)."""
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


def _shard_path(out_dir: Path, start: int, end: int) -> Path:
    return out_dir / SHARDS / f"images-{start:08d}-{end:08d}.npy"


def _image_size(model: nn.Module, vae: nn.Module | None) -> int:
    size = int(model.config.sample_size)
    if vae is None:
        return size
    return size * 2 ** (len(vae.config.block_out_channels) - 1)  # as diffusers' vae_scale_factor


# ----------------------------------------------------------------------------- shards on disk

def _read_shard(path: Path, count: int, size: int) -> np.ndarray | None:
    """The shard at `path` (memory-mapped) if it is complete and of the expected shape, else None."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:  # truncated or not an .npy file
        logger.warning("shard %s is unreadable (%s); sampling it again", path.name, exc)
        return None
    if array.dtype != np.uint8 or array.shape != (count, size, size, 3):
        logger.warning("shard %s holds %s %s, expected uint8 %s; sampling it again", path.name, array.dtype,
                       array.shape, (count, size, size, 3))
        return None
    return array


def _prepare(out_dir: Path, settings: dict[str, Any], ranges: list[tuple[int, int]], size: int) -> list[int]:
    """Rank 0: check or write the manifest, drop stale temporary files, list the missing shards."""
    shards = out_dir / SHARDS
    manifest = shards / MANIFEST
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if differ:
            detail = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:4])
            raise ValueError(f"{out_dir} holds shards sampled with other settings ({detail}); use another output "
                             f"folder, or delete {shards} to start over")
    else:
        if shards.is_dir() and any(shards.glob("images-*.npy")):
            raise ValueError(f"{shards} holds shards but no {MANIFEST} (their settings are unknown); use another "
                             f"output folder, or delete {shards} to start over")
        write_json_atomic(manifest, settings)
    for stale in shards.glob(".*.tmp"):  # left by a process killed in mid-write; nobody writes yet
        stale.unlink(missing_ok=True)
    missing = [k for k, (s, e) in enumerate(ranges) if _read_shard(_shard_path(out_dir, s, e), e - s, size) is None]
    if len(missing) < len(ranges):
        logger.info("%s: %d of %d shards already sampled; sampling the other %d", out_dir,
                    len(ranges) - len(missing), len(ranges), len(missing))
    return missing


def _write_shard(path: Path, pixels: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, pixels)


def _assemble(out_dir: Path, ranges: list[tuple[int, int]], size: int) -> Path:
    """Rank 0: stream every shard into ``samples.npz`` (``arr_0``, uint8 NHWC), atomically, without
    holding all N images in memory (FID-50K of 256 px images is 9.8 GB)."""
    arrays = [_read_shard(_shard_path(out_dir, s, e), e - s, size) for s, e in ranges]
    missing = [f"{s}-{e}" for (s, e), a in zip(ranges, arrays) if a is None]
    if missing:
        raise RuntimeError(f"{out_dir}: shards of images {missing[:4]} are missing or unreadable after sampling; "
                           f"run the same command again to sample them")
    num_images = ranges[-1][1]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_images, size, size, 3)}
    path = out_dir / SAMPLES
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for array in arrays:
                member.write(np.ascontiguousarray(array).data)
    return path


# ----------------------------------------------------------------------------- sampling

def _decode(vae: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: pixels as they are, latents through the VAE."""
    if vae is None:
        return x
    param = next(vae.parameters())
    with torch.no_grad():
        images = vae.decode(x.to(param.device, param.dtype) / float(vae.config.scaling_factor)).sample
    return images.float().clamp(-1, 1).cpu()


def _check_arguments(model: nn.Module, num_images: int, shard_size: int, batch_size: int, labels,
                     vae: nn.Module | None) -> int:
    for name, value in (("num_images", num_images), ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"sample_to_npz: {name} must be a positive integer, got {value!r}")
    num_classes = int(model.config.num_embeds_ada_norm)
    if labels is not None:
        labels = list(labels)
        if not labels or any(not 0 <= int(v) < num_classes for v in labels):
            raise ValueError(f"labels must be class ids in [0, {num_classes}), got {labels[:16]}")
    channels = int(model.config.in_channels)
    if vae is None and channels not in (1, 3):
        raise ValueError(f"the model samples {channels}-channel latents, not images: give the VAE that decodes "
                         f"them (vae=AutoencoderKL, `--vae PATH`)")
    if vae is not None and int(vae.config.latent_channels) != channels:
        raise ValueError(f"the VAE decodes {vae.config.latent_channels}-channel latents but the model samples "
                         f"{channels} channels; give the VAE the model was trained with")
    return num_classes


def sample_to_npz(model: nn.Module, out_dir, num_images: int, *, seed: int = 0, labels: Sequence[int] | None = None,
                  num_inference_steps: int = 50, guidance_scale: float = 1.5, vae: nn.Module | None = None,
                  shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = True) -> Path:
    """Sample `num_images` images into ``out_dir/samples.npz`` (``arr_0``: uint8 NHWC), in shards.

    Under a torch.distributed process group (``torchrun``) this is a collective: every rank
    calls it with the same arguments (checked) and samples its share of the missing shards;
    rank 0 then assembles the file. A rerun with the same arguments samples only the shards
    that are missing or unreadable (see the module docstring).

    Args:
        model (`nn.Module`): a DiT-like model (`mosaicdiff.core.sampling.sample`) on its device.
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
        ValueError: bad arguments, more ranks than images, ranks launched with different
            arguments or models, a latent model without a VAE, or an `out_dir` holding shards of
            other settings (raised on every rank).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    num_classes = _check_arguments(model, num_images, shard_size, batch_size, labels, vae)
    size = _image_size(model, vae)
    settings = {
        "format": _FORMAT, "num_images": int(num_images), "seed": int(seed),
        "labels": None if labels is None else [int(v) for v in labels], "num_classes": num_classes,
        "num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
        "shard_size": int(shard_size), "batch_size": int(batch_size), "image_size": size,
        "model_sha256": distributed.state_digest(model), "vae_sha256": distributed.state_digest(vae),
    }
    distributed.check_same_across_ranks(settings, "sampling settings")
    world = distributed.world_size()
    if world > num_images:  # after the collective above: every rank raises, none waits
        raise ValueError(f"{world} ranks for {num_images} images: every rank needs at least one image; launch at "
                         f"most {num_images} processes or sample more images")
    ranges = shard_ranges(int(num_images), int(shard_size))
    missing = distributed.run_on_main(lambda: _prepare(out_dir, settings, ranges, size))
    rank = distributed.rank()
    if 0 < len(missing) < world and distributed.is_main_process():
        logger.warning("%d shards to sample for %d ranks: %d ranks stay idle (a smaller shard_size spreads the "
                       "work)", len(missing), world, world - len(missing))
    mine = [ranges[k] for k in missing[rank::world]]
    bar = tqdm(total=sum(e - s for s, e in mine), desc=f"sampling (rank {rank} of {world})", unit="img",
               disable=not (progress and distributed.is_main_process()))
    for start, end in mine:
        chunks = []
        for b in range(start, end, int(batch_size)):
            stop = min(b + int(batch_size), end)
            x = sampling.sample(model, image_labels(b, stop, num_classes, labels),
                                noise=image_noise(model, seed, b, stop), num_inference_steps=int(num_inference_steps),
                                guidance_scale=guidance_scale, progress=False, clamp=vae is None)
            chunks.append(to_uint8_nhwc(_decode(vae, x)))
            bar.update(stop - b)
        pixels = np.concatenate(chunks)
        if pixels.shape[1:] != (size, size, 3):
            raise RuntimeError(f"decoded images are {pixels.shape[1:]}, expected {(size, size, 3)}")
        _write_shard(_shard_path(out_dir, start, end), pixels)
    bar.close()
    distributed.barrier()
    return distributed.run_on_main(lambda: _assemble(out_dir, ranges, size))

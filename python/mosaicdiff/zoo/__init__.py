"""The embedded small real models, shipped with the package and loaded offline.

- `load_digits_dit()`: a class-conditional DiT (diffusers `DiTTransformer2DModel`, 6 blocks, 6 heads
  of 32, patch 4, 16x16x1 pixels, 10 classes + null class 10 for classifier-free guidance) trained
  here on the scikit-learn digits (see `zoo.train_dit`).
- `load_digits_unet()`: a text-conditioned U-Net (diffusers `UNet2DConditionModel`, widths 32 / 64,
  cross-attention and GEGLU feed-forwards, 4 and 8 heads of 8) trained here on the same digits
  with the class label as the "prompt": `load_digits_label_tokens()` is its learned table of
  label tokens (the text states; the last row is the null prompt) and `digits_unet_scheduler()`
  its sampler (see `zoo.train_unet`).
- `load_digits_pixart()`: a text-conditioned DiT in PixArt's layout (diffusers
  `PixArtTransformer2DModel`: adaLN-single, self- and cross-attention, 6 blocks of 6 heads x 32,
  patch 4) trained on the same digits with its own table of label tokens
  (``load_digits_label_tokens(model="pixart")``); `digits_pixart_scheduler()` is its DPM-Solver++
  sampler (see `zoo.train_pixart`).
- `load_digits_mmdit()`: a rectified-flow MMDiT in Flux.1's layout (diffusers
  `FluxTransformer2DModel`: 2 double-stream joint-attention blocks, 4 single-stream blocks, 4 heads
  of 16, 3-axis RoPE, no guidance embedding) trained on the same digits, the 16x16 pixels packed
  2x2 into 64 tokens of 4 channels as FluxPipeline packs latents; its label "prompt" (label
  tokens, pooled vector, text and image positions) is ``load_digits_mmdit_conditioning(labels)``
  and `digits_mmdit_scheduler()` its Euler sampler (see `zoo.train_mmdit`).
- `load_digits_classifier()`: a small CNN on the same images (see `zoo.classifier`), used as the
  feature extractor for FID and for class accuracy (`mosaicdiff.eval.quality`).
"""

from __future__ import annotations

from pathlib import Path

import torch

ZOO_DIR = Path(__file__).resolve().parent
DIGITS_DIT_DIR = ZOO_DIR / "digits_dit"
DIGITS_CLASSIFIER_DIR = ZOO_DIR / "digits_classifier"
DIGITS_UNET_DIR = ZOO_DIR / "digits_unet"
DIGITS_PIXART_DIR = ZOO_DIR / "digits_pixart"
DIGITS_MMDIT_DIR = ZOO_DIR / "digits_mmdit"


def _load_diffusers(class_name: str, folder: Path, what: str, module: str, device, torch_dtype):
    """A diffusers model class `class_name` from the shipped `folder`, offline, in eval mode."""
    import diffusers

    _require(folder / "diffusion_pytorch_model.safetensors", f"{what} weights", module, folder)
    kwargs = {"local_files_only": True, "low_cpu_mem_usage": False}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return getattr(diffusers, class_name).from_pretrained(str(folder), **kwargs).to(device).eval()


def _require(path: Path, what: str, module: str, out: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"embedded {what} not found at {path}; reproduce it with "
                                f"`python -m mosaicdiff.zoo.{module} --out {out}`")


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
    return _load_diffusers("DiTTransformer2DModel", DIGITS_DIT_DIR, "digits DiT", "train_dit", device, torch_dtype)


def load_digits_unet(device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load the embedded digits U-Net from the package directory, offline.

    Returns:
        A `diffusers.UNet2DConditionModel` in eval mode; its prompts are `load_digits_label_tokens`.

    Raises:
        FileNotFoundError: if the shipped weights are missing.
    """
    return _load_diffusers("UNet2DConditionModel", DIGITS_UNET_DIR, "digits U-Net", "train_unet", device,
                           torch_dtype)


def load_digits_pixart(device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load the embedded digits PixArt from the package directory, offline.

    Returns:
        A `diffusers.PixArtTransformer2DModel` in eval mode; its prompts are
        ``load_digits_label_tokens(model="pixart")``.

    Raises:
        FileNotFoundError: if the shipped weights are missing.
    """
    return _load_diffusers("PixArtTransformer2DModel", DIGITS_PIXART_DIR, "digits PixArt", "train_pixart", device,
                           torch_dtype)


def load_digits_mmdit(device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None):
    """Load the embedded digits MMDiT from the package directory, offline.

    Returns:
        A `diffusers.FluxTransformer2DModel` in eval mode; its inputs are packed images
        (`zoo.train_mmdit.pack`), ``timestep`` in [0, 1] and ``load_digits_mmdit_conditioning(labels)``.

    Raises:
        FileNotFoundError: if the shipped weights are missing.
    """
    return _load_diffusers("FluxTransformer2DModel", DIGITS_MMDIT_DIR, "digits MMDiT", "train_mmdit", device,
                           torch_dtype)


def load_digits_mmdit_conditioning(labels, device: str | torch.device = "cpu",
                                   torch_dtype: torch.dtype | None = None) -> dict:
    """The digits MMDiT's text inputs for digit `labels`: the keyword arguments
    ``encoder_hidden_states`` `(B, 4, 64)`, ``pooled_projections`` `(B, 64)`, ``txt_ids`` `(4, 3)`
    (zeros) and ``img_ids`` `(64, 3)` (the 8x8 grid of packed tokens) of its forward.

    Args:
        labels: digits in 0..9 (a sequence or an integer tensor).
        torch_dtype: dtype of the two embeddings (default float32); the positions stay float32.

    Raises:
        ValueError: if a label is outside 0..9.
        FileNotFoundError: if the shipped label conditioning is missing.
    """
    from safetensors.torch import load_file

    from mosaicdiff.zoo.data import NUM_CLASSES
    from mosaicdiff.zoo.train_mmdit import LabelConditioning

    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < NUM_CLASSES:
        raise ValueError(f"load_digits_mmdit_conditioning: labels must be digits in 0..{NUM_CLASSES - 1}, "
                         f"got {labels.tolist()}")
    path = DIGITS_MMDIT_DIR / "label_tokens.safetensors"
    _require(path, "digits MMDiT label conditioning", "train_mmdit", DIGITS_MMDIT_DIR)
    shipped = load_file(str(path))
    conditioning = LabelConditioning()
    conditioning.load_state_dict({"tokens.table": shipped["table"], "pooled": shipped["pooled"]})
    with torch.no_grad():
        kwargs = conditioning(labels)
    dtypes = {"encoder_hidden_states": torch_dtype, "pooled_projections": torch_dtype}
    return {k: v.to(device=device, dtype=dtypes.get(k) or v.dtype) for k, v in kwargs.items()}


def load_digits_label_tokens(device: str | torch.device = "cpu", model: str = "unet") -> torch.Tensor:
    """A text-conditioned digits model's prompt table `(11, 4, 64)`: row ``c`` the text states of
    digit ``c``, row 10 the null prompt (classifier-free guidance).

    Args:
        model: whose table: ``"unet"`` (the digits U-Net, default), ``"pixart"`` (the digits PixArt) or
            ``"mmdit"`` (the digits MMDiT, whose null row is untrained: it never saw a dropped prompt);
            each was trained with its own.
    """
    from safetensors.torch import load_file

    folders = {"unet": (DIGITS_UNET_DIR, "train_unet"), "pixart": (DIGITS_PIXART_DIR, "train_pixart"),
               "mmdit": (DIGITS_MMDIT_DIR, "train_mmdit")}
    if model not in folders:
        raise ValueError(f"load_digits_label_tokens: model must be one of {sorted(folders)}, got {model!r}")
    folder, module = folders[model]
    path = folder / "label_tokens.safetensors"
    _require(path, f"digits {model} label tokens", module, folder)
    return load_file(str(path))["table"].to(device)


def digits_unet_scheduler():
    """DDIM (eta 0) on the betas the digits U-Net was trained with: SD's ``scaled_linear``
    0.00085..0.012, T = 1000, no x0 clipping (pixels leave [-1, 1] only slightly; the result is
    clamped)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False)


def digits_pixart_scheduler():
    """The sampler PixArt ships with, on the betas the digits PixArt was trained with: DPM-Solver++
    (2nd order, multistep) on linear betas 0.0001..0.02, T = 1000, no thresholding."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                       beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)


def digits_mmdit_scheduler():
    """The digits MMDiT's sampler: Euler on rectified flow, ``FlowMatchEulerDiscreteScheduler`` with
    T = 1000 and SD3's ``shift=3.0`` (more of the steps at high noise). Unshifted (the trainer's
    own check, `zoo.train_mmdit.euler_scheduler`), flow sampling has no slow high-noise stage for
    the closed form to find (docs/method.md, "Divide under flow matching")."""
    from mosaicdiff.zoo.train_mmdit import euler_scheduler

    return euler_scheduler(shift=3.0)


def load_digits_classifier(device: str | torch.device = "cpu"):
    """Load the embedded digits classifier (`zoo.classifier.DigitsClassifier`, eval mode).

    Raises:
        FileNotFoundError: if the shipped weights are missing.
    """
    from mosaicdiff.zoo.classifier import load

    return load(DIGITS_CLASSIFIER_DIR, device)


__all__ = ["load_digits_dit", "load_digits_unet", "load_digits_pixart", "load_digits_mmdit",
           "load_digits_mmdit_conditioning", "load_digits_label_tokens", "digits_unet_scheduler",
           "digits_pixart_scheduler", "digits_mmdit_scheduler", "load_digits_classifier", "DIGITS_DIT_DIR",
           "DIGITS_UNET_DIR", "DIGITS_PIXART_DIR", "DIGITS_MMDIT_DIR", "DIGITS_CLASSIFIER_DIR"]

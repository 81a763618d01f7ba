"""The inputs of `MosaicDiT.forward`, checked from metadata only (no device sync) and turned into
what the stage forward takes: the stage index, a (B,) float32 timestep and (B,) int64 labels."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_hidden_states", "class_labels_tensor", "class_labels_traced", "select_stages"]


@torch.compiler.disable
def select_stages(model, timestep, batch: int, device: torch.device) -> tuple[list, torch.Tensor]:
    """Read the timestep on the host once; return the stage groups (`MosaicModel.stage_rows`)
    and a (B,) float32 device tensor of the timesteps.

    A Python number or a CPU tensor (the scheduler's own timesteps) costs no device sync: the
    stage is read on the host and the device vector is a fill (one value) or an async copy.
    A device tensor (what ``DiTPipeline`` passes) must be read back: one sync per forward.
    """
    if timestep is None:
        raise ValueError("MosaicDiT.forward: `timestep` is required (got None)")
    if isinstance(timestep, torch.Tensor):
        t = timestep.detach()
        if not (t.numel() == 1 or (t.dim() == 1 and t.numel() == batch)):
            raise ValueError(
                f"MosaicDiT.forward: timestep must be a number, a 0-d tensor or a ({batch},) "
                f"tensor, got shape {tuple(t.shape)}"
            )
        host = t.reshape(-1).double().cpu()  # the one host read
        if bool((host == host[0]).all()):  # one timestep for the whole batch (every sampler): a fill
            t_vec = torch.full((batch,), float(host[0]), dtype=torch.float32, device=device)
            host = host[:1]
        else:
            t_vec = t.reshape(-1).to(dtype=torch.float32).to(device, non_blocking=True)
    elif isinstance(timestep, (int, float)) or hasattr(timestep, "__float__"):
        host = torch.tensor([float(timestep)], dtype=torch.float64)
        t_vec = torch.full((batch,), float(timestep), dtype=torch.float32, device=device)
    else:
        raise TypeError(f"MosaicDiT.forward: unsupported timestep type {type(timestep).__name__}")
    return model.stage_rows(host, batch), t_vec


def _num_label_rows(model) -> int:
    """Rows of the class embedding table: the classes, plus the null class when CFG-trained."""
    emb = model.shared.conditioning.embedders[0]
    table = getattr(getattr(emb, "class_embedder", None), "embedding_table", None)
    if isinstance(table, nn.Embedding):
        return int(table.num_embeddings)
    return int(model.config.num_embeds_ada_norm) + 1


@torch.compiler.disable
def class_labels_tensor(model, class_labels, batch: int, device: torch.device) -> torch.Tensor:
    """Labels as a (B,) int64 device tensor; range-checked while they are still on the host."""
    if class_labels is None:
        raise ValueError("MosaicDiT.forward: `class_labels` is required (got None)")
    labels = torch.as_tensor(class_labels).reshape(-1)  # lists and ints stay on the host
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"MosaicDiT.forward: class_labels must be integers, got {labels.dtype}")
    if labels.numel() == 1 and batch > 1:
        labels = labels.expand(batch)
    if labels.numel() != batch:
        raise ValueError(f"MosaicDiT.forward: class_labels must have {batch} entries, got {labels.numel()}")
    # Host labels cost nothing to check; device labels would cost a sync per forward, so they
    # are not checked (an out-of-range one fails in the embedding lookup, as in diffusers).
    if labels.device.type == "cpu":
        rows = _num_label_rows(model)
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= rows:
            null = int(model.config.num_embeds_ada_norm)
            valid = f"[0, {null}) or the null class {null}" if rows > null else f"[0, {rows})"
            raise ValueError(
                f"MosaicDiT.forward: class_labels must be class ids in {valid}, got {lo if lo < 0 else hi}"
            )
    return labels.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


def class_labels_traced(class_labels, batch: int, device: torch.device) -> torch.Tensor:
    """`class_labels_tensor` as ``torch.compile`` traces it: the same (B,) int64 device tensor, the
    range left to the embedding lookup (checking it would read the labels on the host)."""
    if class_labels is None:
        raise ValueError("MosaicDiT.forward: `class_labels` is required (got None)")
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"MosaicDiT.forward: class_labels must be integers, got {labels.dtype}")
    if labels.numel() not in (1, batch):
        raise ValueError(f"MosaicDiT.forward: class_labels must have {batch} entries, got {labels.numel()}")
    return labels.to(device=device, dtype=torch.int64).expand(batch).contiguous()


def check_hidden_states(model, hidden_states: torch.Tensor) -> None:
    """Shape, dtype and device against the model, from metadata only (no device sync)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
        is_tensor = isinstance(hidden_states, torch.Tensor)
        shape = tuple(hidden_states.shape) if is_tensor else type(hidden_states).__name__
        raise ValueError(f"MosaicDiT.forward: hidden_states must be (B, C, H, W), got {shape}")
    channels, p = int(model.config.in_channels), int(model.config.patch_size)
    _, c, h, w = hidden_states.shape
    if c != channels:
        raise ValueError(
            f"MosaicDiT.forward: hidden_states has {c} channels but the model expects "
            f"in_channels={channels} (shape (B, {channels}, H, W))"
        )
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(
            f"MosaicDiT.forward: hidden_states height and width must be positive multiples of "
            f"patch_size={p}, got {h}x{w} (the model was trained at {model.config.sample_size})"
        )
    # the weights' dtype and device from one tensor: ModelMixin.dtype/.device walk every module (~1 ms)
    weight = model.shared.conditioning.mod_weight
    if hidden_states.dtype != weight.dtype:
        raise TypeError(
            f"MosaicDiT.forward: hidden_states is {hidden_states.dtype} but the model's weights are "
            f"{weight.dtype}; pass hidden_states.to(model.dtype) (DiTTransformer2DModel does not cast "
            f"either; DiTPipeline and mosaicdiff.sample do it for you)"
        )
    if hidden_states.device != weight.device:
        raise ValueError(
            f"MosaicDiT.forward: hidden_states is on {hidden_states.device} but the model is on "
            f"{weight.device}; move one of them"
        )

"""The stage-switching U-Net: the dense U-Net's skeleton, and per stage its compact transformer blocks.

`MosaicUNet` keeps everything pruning does not touch (ResNets, convolutions, the time / added
condition embeddings, the ``Transformer2DModel``s' norms and projections) once, in a copy of the
U-Net whose ``BasicTransformerBlock``s are replaced by `StageSwitchedBlock`s. Those hold no
weights: each forwards to the compact block of the stage the current timestep selects (read once
per U-Net forward on the host). The call signature and output are ``UNet2DConditionModel``'s, so
``pipe.unet = mosaic`` works in a Stable Diffusion (XL) pipeline with any of its schedulers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mosaicdiff.integrations.diffusers_unet import transformer_blocks, unet_skeleton
from mosaicdiff.stage_layout import coverage_problem, stage_index
from mosaicdiff.types import StageSpec
from mosaicdiff.unet_blocks import UNET_INDEX_FIELDS, CompactUNetBlock, CompactUNetBlockWeights, unet_block_shapes

logger = logging.getLogger(__name__)

__all__ = ["MosaicUNet", "StageSwitchedBlock"]


class StageSwitchedBlock(nn.Module):
    """Stands in for one ``BasicTransformerBlock``: runs position `index` of the current stage."""

    def __init__(self, owner: MosaicUNet, index: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # a reference, not a submodule (no cycle in the tree)
        self.index = int(index)

    def forward(self, hidden_states, *args, **kwargs):
        owner = self._owner
        return owner.stage_blocks[owner.current_stage][self.index](hidden_states, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}"


class MosaicUNet(ModelMixin, ConfigMixin):
    r"""A pruned ``UNet2DConditionModel`` whose transformer blocks change with the denoising stage.

    Build one with `from_dense` (what `mosaicdiff.prune` returns for a U-Net) or `from_pretrained`;
    the constructor builds an uninitialised skeleton from the config.

    Its diffusers config is the dense U-Net's (pipelines read ``config.in_channels``,
    ``config.addition_time_embed_dim``, ...) plus ``stages`` (per stage ``name``, ``t_start``,
    ``t_end``, ``sparsity`` and per block ``kept_heads1``, ``kept_heads2``, ``kept_channels``),
    ``dense_reference`` and ``meta``.

    Args:
        unet_config (`dict`): the dense ``UNet2DConditionModel`` config.
        stages (`list[dict]`): the stages as above; they must tile [0, 1000).
        dense_reference (`dict`, *optional*): ``params`` of the dense U-Net.
        meta (`dict`, *optional*): how the mosaic was made.

    Raises:
        ValueError: stages that overlap, leave gaps, or whose block count differs from the U-Net's.
    """

    config_name = "config.json"

    def __init__(self, unet_config: dict, stages: Sequence[dict], dense_reference: dict | None = None,
                 meta: dict | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        unet_config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        stages = [dict(s) for s in stages]
        problem = coverage_problem(stages, meta) if stages else "no stages"
        if problem:
            raise ValueError(f"MosaicUNet: {problem}")
        self.register_to_config(**unet_config, stages=stages, dense_reference=dense_reference, meta=meta)
        with torch.device("meta"):  # the dense blocks are never allocated
            unet = UNet2DConditionModel.from_config(unet_config)
        dense_blocks = transformer_blocks(unet)
        for spec in stages:
            if len(spec["blocks"]) != len(dense_blocks):
                raise ValueError(f"stage {spec['name']!r}: expected {len(dense_blocks)} transformer blocks, "
                                 f"got {len(spec['blocks'])}")
        self._block_facts = [(b.attn1.inner_dim // b.attn1.heads, b.attn1.inner_dim, b.attn2.to_k.in_features)
                             for b in dense_blocks]
        self._eps = float(dense_blocks[0].norm1.eps)
        self.unet = unet_skeleton(unet).to_empty(device="cpu")
        self.stage_blocks = nn.ModuleList(
            nn.ModuleList(self._empty_block(j, b) for j, b in enumerate(spec["blocks"])) for spec in stages)
        self._install_switches()
        self._ranges = [(s["name"], int(s["t_start"]), int(s["t_end"]), float(s["sparsity"])) for s in stages]
        self.current_stage = 0
        self.eval()

    def _empty_block(self, j: int, kept: dict) -> CompactUNetBlock:
        head_dim, width, text = self._block_facts[j]
        idx = {k: torch.as_tensor(kept[k], dtype=torch.int64) for k in UNET_INDEX_FIELDS}
        shapes = unet_block_shapes(idx["kept_heads1"].numel(), idx["kept_heads2"].numel(),
                                   idx["kept_channels"].numel(), head_dim, width, text)
        weights = CompactUNetBlockWeights(**idx, **{k: torch.empty(shape) for k, shape in shapes.items()})
        return CompactUNetBlock(weights, head_dim, self._eps)

    def _install_switches(self) -> None:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        slots = [(m, k) for m in self.unet.modules() if isinstance(m, Transformer2DModel)
                 for k in range(len(m.transformer_blocks))]
        for j, (m, k) in enumerate(slots):
            m.transformer_blocks[k] = StageSwitchedBlock(self, j)

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicUNet:
        """A mosaic of a dense U-Net and its pruned stages (the U-Net is left unchanged; its
        un-pruned modules are copied once, its transformer blocks not at all).

        ``share_producers=True`` is not implemented for U-Nets yet: each stage stores its blocks.
        """
        if share_producers:
            raise NotImplementedError("MosaicUNet: shared producer storage is not implemented yet; "
                                      "prune with share_producers=False")
        meta = {**(meta or {}), **({"source": source} if source else {})}
        stage_cfgs = [{"name": s.name, "t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity),
                       "blocks": [{k: getattr(w, k).tolist() for k in UNET_INDEX_FIELDS} for w in s.blocks]}
                      for s in stages]
        params = sum(p.numel() for p in dense.parameters())
        mosaic = cls(dict(dense.config), stage_cfgs, dense_reference={"params": int(params)}, meta=meta)
        mosaic.unet = unet_skeleton(dense)
        mosaic._install_switches()
        ref = next(dense.parameters())
        for i, spec in enumerate(stages):
            for j, w in enumerate(spec.blocks):
                like = {k: (v if k.startswith("kept_") else v.to(ref.device, ref.dtype)) for k, v in w.tensors().items()}
                mosaic.stage_blocks[i][j] = CompactUNetBlock(CompactUNetBlockWeights(**like), mosaic._block_facts[j][0],
                                                             mosaic._eps)
        return mosaic.eval()

    # ------------------------------------------------------------------ what pipelines read

    @property
    def add_embedding(self):
        return self.unet.add_embedding

    @property
    def stage_ranges(self) -> list[tuple[str, int, int, float]]:
        return list(self._ranges)

    @property
    def num_stages(self) -> int:
        return len(self._ranges)

    def stage_for(self, t) -> int:
        """Index of the stage whose ``[t_start, t_end)`` contains timestep `t` (a number or one-value tensor)."""
        if isinstance(t, torch.Tensor):
            values = t.reshape(-1).unique()
            if values.numel() != 1:
                raise ValueError(f"all timesteps of a batch must fall in one stage, got {values.tolist()}")
            t = values.item()
        return stage_index(self._ranges, float(t))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        """``UNet2DConditionModel.forward``, with the stage picked from `timestep`."""
        self.current_stage = self.stage_for(timestep)
        return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def enable_cross_kv_cache(self, enabled: bool = True) -> MosaicUNet:
        """Compute each block's cross-attention k/v of the text states once per sampling run.

        The text states are the same tensor at every step of a pipeline run; each block keeps the
        k/v of the last one it saw (its own kept heads) and recomputes only when another tensor,
        or the same one modified in place, arrives. Returns self.
        """
        for blocks in self.stage_blocks:
            for block in blocks:
                block.cache_cross_kv = bool(enabled)
                block.__dict__.pop("_kv_cache", None)
        return self

    def memory_report(self) -> dict[str, Any]:
        """Parameter counts of the skeleton and of each stage's blocks against the dense U-Net."""
        skeleton = sum(p.numel() for p in self.unet.parameters())
        stages = {name: sum(p.numel() for p in blocks.parameters())
                  for (name, *_), blocks in zip(self._ranges, self.stage_blocks)}
        total = skeleton + sum(stages.values())
        dense = (self.config.dense_reference or {}).get("params", 0)
        return {"shared_params": skeleton, "stages": stages, "mosaic_params": total, "dense_params": dense,
                "ratio": total / dense if dense else float("nan")}

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save as ``config.json`` + ``model.safetensors``, crash-safely (`mosaicdiff.unet_serialization`)."""
        from mosaicdiff.unet_serialization import save_unet_mosaic

        save_unet_mosaic(self, save_directory)

    @classmethod
    def from_pretrained(cls, directory, *, device=None, torch_dtype=None, subfolder: str | None = None,
                        **kwargs) -> MosaicUNet:
        """Load a folder written by `save_pretrained` (``subfolder``: e.g. a pipeline's ``"unet"``)."""
        from pathlib import Path

        from mosaicdiff.unet_serialization import load_unet_mosaic

        directory = Path(directory) / subfolder if subfolder else Path(directory)
        return load_unet_mosaic(cls, directory, device=device, torch_dtype=torch_dtype)

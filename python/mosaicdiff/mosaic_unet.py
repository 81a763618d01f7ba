"""The stage-switching U-Net: the dense U-Net's skeleton, and per stage its compact transformer blocks.

`MosaicUNet` keeps everything pruning does not touch (ResNets, convolutions, the time / added
condition embeddings, the ``Transformer2DModel``s' norms and projections) once, in a copy of the
U-Net in which each ``Transformer2DModel``'s list of ``BasicTransformerBlock``s is replaced by one
`StageSwitchedChain`. It holds no weights: it runs that model's compact blocks of the stage the
current timestep selects (read once per U-Net forward on the host), with the residual add that ends
block i fused with LN1 of block i + 1 and, in the last block, ff2 fused with its residual add. The
call signature and output are ``UNet2DConditionModel``'s, so ``pipe.unet = mosaic`` works in a
Stable Diffusion (XL) pipeline with any of its schedulers.

By default (``mosaicdiff.prune``) each block position stores its producer rows once for all
stages (``producer_storage``, `mosaicdiff.unet_shared_producers`); a mosaic whose stages select
their units freely stores a copy per stage.
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
from mosaicdiff.unet_blocks import (
    UNET_INDEX_FIELDS,
    CompactUNetBlock,
    CompactUNetBlockWeights,
    check_block_call,
    unet_block_shapes,
)
from mosaicdiff.unet_shared_producers import (
    CONSUMER_FIELDS,
    SharedUNetBlock,
    UNetSharedProducers,
    share_unet_producers,
    stage_ranges,
)

logger = logging.getLogger(__name__)

__all__ = ["MosaicUNet", "StageSwitchedChain"]


class StageSwitchedChain(nn.Module):
    """Stands in for the blocks ``start..stop-1`` of one ``Transformer2DModel``: runs the current
    stage's compact blocks there, one after another, with the block boundaries fused.

    Per block: LN1 comes in with the stream (the first block computes it, ``layer_norm``); the
    attention out projections end in ``residual_layer_norm`` with LN2 / LN3; the feed-forward's
    residual add is fused with LN1 of the next block (``residual_layer_norm``) or, in the last
    block, with ff2 (``linear_residual``). Its call signature is a ``BasicTransformerBlock``'s,
    which is how ``Transformer2DModel.forward`` calls each entry of its ``transformer_blocks``.
    """

    def __init__(self, owner: MosaicUNet, start: int, stop: int):
        super().__init__()
        if not 0 <= start < stop:
            raise ValueError(f"StageSwitchedChain: expected 0 <= start < stop, got {start}, {stop}")
        object.__setattr__(self, "_owner", owner)  # a reference, not a submodule (no cycle in the tree)
        self.start, self.stop = int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def blocks(self) -> list[CompactUNetBlock]:
        """The compact blocks this chain runs in the current stage."""
        owner = self._owner
        return list(owner.stage_blocks[owner.current_stage][self.start:self.stop])

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        """``BasicTransformerBlock``'s signature; masks are not supported (None), as in `CompactUNetBlock`."""
        check_block_call(attention_mask, encoder_attention_mask, encoder_hidden_states)
        blocks = self.blocks()
        h = hidden_states.contiguous()
        x = blocks[0].norm1(h)
        for block, following in zip(blocks, [*blocks[1:], None]):
            h, x = block.forward_normed(h, x, encoder_hidden_states, next_block=following)
        return h

    def extra_repr(self) -> str:
        return f"blocks={self.start}..{self.stop - 1}"


class MosaicUNet(ModelMixin, ConfigMixin):
    r"""A pruned ``UNet2DConditionModel`` whose transformer blocks change with the denoising stage.

    Build one with `from_dense` (what `mosaicdiff.prune` returns for a U-Net) or `from_pretrained`;
    the constructor builds an uninitialised skeleton from the config.

    Its diffusers config is the dense U-Net's (pipelines read ``config.in_channels``,
    ``config.addition_time_embed_dim``, ...) plus ``stages`` (per stage ``name``, ``t_start``,
    ``t_end``, ``sparsity`` and per block ``kept_heads1``, ``kept_heads2``, ``kept_channels``),
    ``shared_producers``, ``dense_reference`` and ``meta``.

    Two layouts: every stage owns its compact blocks (`CompactUNetBlock`), or
    (``shared_producers``) every block position stores its producer rows once
    (`mosaicdiff.unet_shared_producers.UNetSharedProducers`, in ``producer_storage``) and the
    stages' `SharedUNetBlock`\ s hold only their norms and compensated consumers.

    Args:
        unet_config (`dict`): the dense ``UNet2DConditionModel`` config.
        stages (`list[dict]`): the stages as above; they must tile [0, 1000).
        dense_reference (`dict`, *optional*): ``params`` of the dense U-Net.
        meta (`dict`, *optional*): how the mosaic was made.
        shared_producers (`list[dict]`, *optional*): per block position the stored units in
            storage order (``heads1``, ``heads2``, ``channels``); each stage's kept lists must be a
            contiguous run of them. None: every stage stores its own producers.

    Raises:
        ValueError: stages that overlap, leave gaps, or whose block count differs from the U-Net's;
            ``shared_producers`` of the wrong length or that a stage's kept lists do not fit.
    """

    config_name = "config.json"
    #: `mosaicdiff.prune` defaults to ``share_producers=True`` for U-Nets.
    shares_producers = True

    def __init__(self, unet_config: dict, stages: Sequence[dict], dense_reference: dict | None = None,
                 meta: dict | None = None, shared_producers: Sequence[dict] | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        unet_config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        stages = [dict(s) for s in stages]
        problem = coverage_problem(stages, meta) if stages else "no stages"
        if problem:
            raise ValueError(f"MosaicUNet: {problem}")
        shared_producers = None if shared_producers is None else [dict(p) for p in shared_producers]
        self.register_to_config(**unet_config, stages=stages, dense_reference=dense_reference, meta=meta,
                                shared_producers=shared_producers)
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
        if shared_producers is None:
            self.producer_storage = None
            self.stage_blocks = nn.ModuleList(
                nn.ModuleList(self._empty_block(j, b) for j, b in enumerate(spec["blocks"])) for spec in stages)
        else:
            self._empty_shared_blocks(stages, shared_producers)
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

    def _empty_shared_blocks(self, stages: list[dict], shared_producers: list[dict]) -> None:
        if len(shared_producers) != len(self._block_facts):
            raise ValueError(f"MosaicUNet: shared_producers needs one entry per transformer block "
                             f"({len(self._block_facts)}), got {len(shared_producers)}")
        stores = []
        self.stage_blocks = nn.ModuleList(nn.ModuleList() for _ in stages)
        for j, (units, (head_dim, width, text)) in enumerate(zip(shared_producers, self._block_facts)):
            store = UNetSharedProducers(units["heads1"], units["heads2"], units["channels"], head_dim, width, text)
            try:
                ranges = stage_ranges(store, [spec["blocks"][j] for spec in stages])
            except ValueError as exc:
                raise ValueError(f"MosaicUNet: the stages' block {j} does not fit shared_producers[{j}]: {exc}") \
                    from None
            for i, r in enumerate(ranges):
                h1, h2, f = (r[k][1] - r[k][0] for k in ("heads1", "heads2", "channels"))
                shapes = unet_block_shapes(h1, h2, f, head_dim, width, text)
                consumers = {name: torch.empty(shapes[name]) for name in CONSUMER_FIELDS}
                self.stage_blocks[i].append(SharedUNetBlock(store, r, consumers, head_dim, self._eps))
            stores.append(store)
        self.producer_storage = nn.ModuleList(stores)

    def _install_switches(self) -> None:
        """One `StageSwitchedChain` per ``Transformer2DModel`` of the skeleton, over its blocks'
        positions in `transformer_blocks` order (the order of `stage_blocks`)."""
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        start = 0
        for m in self.unet.modules():
            if isinstance(m, Transformer2DModel):
                stop = start + sum(len(b) if isinstance(b, StageSwitchedChain) else 1 for b in m.transformer_blocks)
                if stop > start:  # a model without blocks keeps its empty list
                    m.transformer_blocks = nn.ModuleList([StageSwitchedChain(self, start, stop)])
                start = stop
        if start != len(self._block_facts):
            raise ValueError(f"MosaicUNet: the skeleton has {start} transformer blocks, the stages "
                             f"{len(self._block_facts)}")

    @classmethod
    def from_dense(cls, dense: nn.Module, stages: Sequence[StageSpec], *, source: str | None = None,
                   meta: dict[str, Any] | None = None, share_producers: bool | None = None) -> MosaicUNet:
        """A mosaic of a dense U-Net and its pruned stages (the U-Net is left unchanged; its
        un-pruned modules are copied once, its transformer blocks not at all).

        Args:
            share_producers (`bool`, *optional*): True: store every block position's producer rows
                once (`mosaicdiff.unet_shared_producers`); the stages' kept heads and channels
                must allow it (nested sets, as ``mosaicdiff.prune(share_producers=True)`` selects
                them). False: every stage stores its own. None: share where the kept sets allow.

        Raises:
            ValueError: ``share_producers=True`` with kept sets that cannot share one storage.
        """
        meta = {**(meta or {}), **({"source": source} if source else {})}
        stage_cfgs = [{"name": s.name, "t_start": int(s.t_start), "t_end": int(s.t_end), "sparsity": float(s.sparsity),
                       "blocks": [{k: getattr(w, k).tolist() for k in UNET_INDEX_FIELDS} for w in s.blocks]}
                      for s in stages]
        ref = next(dense.parameters())
        like = [[CompactUNetBlockWeights(**{k: (v if k.startswith("kept_") else v.to(ref.device, ref.dtype))
                                            for k, v in w.tensors().items()}) for w in spec.blocks] for spec in stages]
        head_dims = [b.attn1.inner_dim // b.attn1.heads for b in transformer_blocks(dense)]
        shared = None
        if share_producers is not False and stages and len({len(spec.blocks) for spec in stages}) == 1 \
                and len(stages[0].blocks) == len(head_dims):  # (else the constructor refuses the stages)
            shared = [share_unet_producers([stage[j] for stage in like], head_dims[j]) for j in range(len(head_dims))]
            shared = None if any(x is None for x in shared) else shared
        if share_producers and shared is None:
            raise ValueError("share_producers=True: the stages' kept heads/channels cannot share one storage "
                             "(each stage's units must be a run of one order: prune with share_producers=True)")
        units = None
        if shared is not None:
            units = [{k: getattr(store, k).tolist() for k in ("heads1", "heads2", "channels")} for store, _ in shared]
            for j, (store, per_stage) in enumerate(shared):
                for i, (ranges, _) in enumerate(per_stage):  # the kept lists in storage order
                    for kind, (a, b) in ranges.items():
                        stage_cfgs[i]["blocks"][j][f"kept_{kind}"] = getattr(store, kind)[a:b].tolist()
        params = sum(p.numel() for p in dense.parameters())
        mosaic = cls(dict(dense.config), stage_cfgs, dense_reference={"params": int(params)}, meta=meta,
                     shared_producers=units)
        mosaic.unet = unet_skeleton(dense)
        mosaic._install_switches()
        if shared is None:
            for i, stage in enumerate(like):
                for j, w in enumerate(stage):
                    mosaic.stage_blocks[i][j] = CompactUNetBlock(w, head_dims[j], mosaic._eps)
            return mosaic.eval()
        mosaic.producer_storage = nn.ModuleList(store for store, _ in shared)
        for j, (store, per_stage) in enumerate(shared):
            for i, (ranges, consumers) in enumerate(per_stage):
                mosaic.stage_blocks[i][j] = SharedUNetBlock(store, ranges, consumers, head_dims[j], mosaic._eps)
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
        """Parameter counts against the dense U-Net: the skeleton (``shared_params``), the shared
        producer storage counted once (``producer_params``, 0 without sharing) and each stage's
        own block tensors (``stages``)."""
        skeleton = sum(p.numel() for p in self.unet.parameters())
        producers = sum(p.numel() for p in self.producer_storage.parameters()) if self.producer_storage else 0
        stages = {name: sum(p.numel() for p in blocks.parameters())  # blocks reference the storage, not own it
                  for (name, *_), blocks in zip(self._ranges, self.stage_blocks)}
        total = skeleton + producers + sum(stages.values())
        dense = (self.config.dense_reference or {}).get("params", 0)
        return {"shared_params": skeleton, "producer_params": producers, "stages": stages, "mosaic_params": total,
                "dense_params": dense, "ratio": total / dense if dense else float("nan")}

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

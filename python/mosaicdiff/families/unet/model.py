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
stages (``producer_storage``, `mosaicdiff.families.unet.producers`); a mosaic whose stages select
their units freely stores a copy per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.model import MosaicModel, skip_weight_init, split_rows
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.stages import StageSpec, coverage_problem
from mosaicdiff.families.unet.adapter import transformer_blocks, unet_skeleton
from mosaicdiff.families.unet.blocks import (
    UNET_INDEX_FIELDS,
    CompactUNetBlock,
    CompactUNetBlockWeights,
    check_block_call,
    unet_block_shapes,
)
from mosaicdiff.families.unet.producers import (
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


class MosaicUNet(MosaicModel):
    r"""A pruned ``UNet2DConditionModel`` whose transformer blocks change with the denoising stage.

    Build one with `from_dense` (what `mosaicdiff.prune` returns for a U-Net) or `from_pretrained`;
    the constructor builds the model from the config with initialised weights (torch's defaults).

    Its diffusers config is the dense U-Net's (pipelines read ``config.in_channels``,
    ``config.addition_time_embed_dim``, ...) plus ``stages`` (per stage ``name``, ``t_start``,
    ``t_end``, ``sparsity`` and per block ``kept_heads1``, ``kept_heads2``, ``kept_channels``),
    ``shared_producers``, ``dense_reference`` and ``meta``.

    Two layouts: every stage owns its compact blocks (`CompactUNetBlock`), or
    (``shared_producers``) every block position stores its producer rows once
    (`mosaicdiff.families.unet.producers.UNetSharedProducers`, in ``producer_storage``) and the
    stages' `SharedUNetBlock`\ s hold only their norms and compensated consumers.

    Args:
        unet_config (`dict`, *optional*): the dense ``UNet2DConditionModel`` config; or its keys
            given as keyword arguments (``MosaicUNet(**mosaic.config)``, as diffusers builds models).
        stages (`list[dict]`): the stages as above; they must tile [0, 1000).
        dense_reference (`dict`, *optional*): ``params``, ``bytes`` and ``dtype`` of the dense U-Net.
        meta (`dict`, *optional*): how the mosaic was made.
        shared_producers (`list[dict]`, *optional*): per block position the stored units in
            storage order (``heads1``, ``heads2``, ``channels``); each stage's kept lists must be a
            contiguous run of them. None: every stage stores its own producers.

    Raises:
        ValueError: stages that overlap, leave gaps, or whose block count differs from the U-Net's;
            ``shared_producers`` of the wrong length or that a stage's kept lists do not fit.
    """

    #: Saved folders (`mosaicdiff.core.serialization`). 2.0 adds ``shared_producers`` (each block
    #: position's producer rows stored once, "producer_storage.<j>.*"); a 1.x folder has none.
    format_name = "mosaicdiff.MosaicUNet"
    format_version = "2.0"
    readable_majors = (1, 2)
    # diffusers model attributes (`MosaicModel.enable_layerwise_casting`, ``compile_repeated_blocks``):
    # UNet2DConditionModel's, its BasicTransformerBlock replaced by the compact blocks.
    _no_split_modules = ["CompactUNetBlock", "SharedUNetBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm", "time_embedding", "add_embedding"]
    _repeated_blocks = ["CompactUNetBlock", "SharedUNetBlock"]

    def __init__(self, unet_config: dict | None = None, stages: Sequence[dict] | None = None,
                 dense_reference: dict | None = None, meta: dict | None = None,
                 shared_producers: Sequence[dict] | None = None, **unet_keys: Any):
        super().__init__()
        from diffusers import UNet2DConditionModel

        unet_config = {**dict(unet_config or {}), **unet_keys}
        unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        stages = [dict(s) for s in stages or ()]
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
        self._init_stages(stages)
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

        start, levels = 0, []
        deepest = len(self.unet.down_blocks) - 1
        for name, m in self.unet.named_modules():
            if isinstance(m, Transformer2DModel):
                stop = start + sum(len(b) if isinstance(b, StageSwitchedChain) else 1 for b in m.transformer_blocks)
                if stop > start:  # a model without blocks keeps its empty list
                    m.transformer_blocks = nn.ModuleList([StageSwitchedChain(self, start, stop)])
                kind, _, rest = name.partition(".")
                index = int(rest.partition(".")[0]) if kind in ("down_blocks", "up_blocks") else deepest
                levels += [index if kind == "down_blocks" else deepest - index if kind == "up_blocks" else deepest] \
                    * (stop - start)
                start = stop
        #: per block position, how many times the latent was halved where the block runs
        self._block_levels = levels
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
                once (`mosaicdiff.families.unet.producers`); the stages' kept heads and channels
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
        with skip_weight_init():  # every weight is assigned below
            mosaic = cls(dict(dense.config), stage_cfgs, dense_reference=cls.dense_reference_of(dense), meta=meta,
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

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from a config (the dense U-Net's keys beside the mosaic's; file keys dropped)."""
        from mosaicdiff.core.serialization import ENVELOPE_KEYS

        config = {k: v for k, v in {**dict(config or {}), **kwargs}.items()
                  if k not in ENVELOPE_KEYS and not k.startswith("_")}
        model = cls(**config)
        return (model, {}) if return_unused_kwargs else model

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        """``UNet2DConditionModel.forward``, with the stage picked from `timestep`.

        A batch whose rows fall in several stages runs each stage on its rows (every batch-first
        argument split alike) and puts the outputs back in row order. With CUDA graphs enabled, a
        call with the text states and SDXL's added conditions only replays the stage's graph.
        """
        batch = int(sample.shape[0])
        groups = self.stage_rows(timestep, batch)
        return_dict = kwargs.pop("return_dict", True)
        added = kwargs.get("added_cond_kwargs") or {}
        graphed = self._graphs is not None and not args and set(kwargs) <= {"added_cond_kwargs"} \
            and set(added) in (set(), {"text_embeds", "time_ids"})
        tokens = int(sample.shape[-2] * sample.shape[-1])

        def run(stage: int, rows: torch.Tensor | None) -> torch.Tensor:
            call = (sample, timestep, encoder_hidden_states, args, kwargs)
            x, t, ehs, a, kw = call if rows is None else split_rows(call, rows, batch)
            self._notify_stage(stage, int(x.shape[0]), tokens, x.dtype, x.device)
            if graphed:
                t_vec = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).contiguous()
                cond = kw.get("added_cond_kwargs") or {}
                return self._graphs(stage, x, t_vec, ehs, *(cond[k] for k in ("text_embeds", "time_ids") if cond))
            self.current_stage = stage
            return self.unet(x, t, ehs, *a, **kw, return_dict=False)[0]

        out = self.run_by_stage(groups, batch, run)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def forward_stage(self, stage: int, sample: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor | None = None,
                      time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-capturable forward of one stage: tensors only, no host reads."""
        self.current_stage = stage
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    def enable_cuda_graphs(self, enabled: bool = True):
        """`StageRuntimeMixin.enable_cuda_graphs`; the cross-attention k/v cache is switched off
        (a graph replays the k/v projections: a cached k/v would be frozen into the graph)."""
        if enabled:
            self.enable_cross_kv_cache(False)
        return super().enable_cuda_graphs(enabled)

    def stage_kernel_shapes(self, stage: int, batch: int, tokens: int,
                            dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The kernel-op shapes of a stage's blocks (`StageRuntimeMixin.stage_kernel_shapes`),
        `tokens` being the latent's H*W: a block `level` halvings down sees ``tokens / 4**level``."""
        items = set()
        for block, level, (head_dim, width, _) in zip(self.stage_blocks[stage], self._block_levels,
                                                      self._block_facts):
            length = tokens // 4 ** level
            items |= {("layer_norm", (batch, length, width)), ("residual_layer_norm", (batch, length, width))}
            if block.heads[0]:
                items.add(("attention", (batch, length, block.heads[0], head_dim)))
            if block.mlp_width:
                # linear_geglu is keyed on its GEMM's full width: value and gate rows, 2 * F
                items |= {("linear_geglu", (batch * length, 2 * block.mlp_width, width)),
                          ("linear_residual", (batch * length, width, block.mlp_width))}
        return [(op, shape, dtype) for op, shape in sorted(items)]

    def enable_cross_kv_cache(self, enabled: bool = True) -> MosaicUNet:
        """Compute each block's cross-attention k/v of the text states once per sampling run.

        The text states are the same tensor at every step of a pipeline run; each block keeps the
        k/v of the last one it saw (its own kept heads) and recomputes only when another tensor,
        or the same one modified in place, arrives. Returns self.
        """
        if enabled and self.cuda_graphs_enabled:
            raise ValueError("MosaicUNet: the cross-attention k/v cache does not work under CUDA graphs (the "
                             "graph would replay a frozen k/v); enable_cuda_graphs(False) first")
        for blocks in self.stage_blocks:
            for block in blocks:
                block.cache_cross_kv = bool(enabled)
                block.__dict__.pop("_kv_cache", None)
        return self

    def _memory_skeleton(self) -> nn.Module:
        return self.unet

    @classmethod
    def upgrade_saved_config(cls, config: dict[str, Any], cfg_path, major: int) -> dict[str, Any]:
        if major == 1 and config.get("shared_producers") is not None:
            raise ValueError(f"MosaicUNet.from_pretrained: {cfg_path}: a format 1.x config with shared_producers "
                             f"(introduced in format 2.0)")
        return config

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        need = check_common_fields(cls, config, cfg_path, UNET_INDEX_FIELDS)
        shared = config.get("shared_producers")
        need(shared is None or isinstance(shared, list), "shared_producers", "null or a list", shared)
        for j, p in enumerate(shared or []):
            for key in ("heads1", "heads2", "channels"):
                v = p.get(key) if isinstance(p, dict) else None
                need(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
                     f"shared_producers[{j}].{key}", "a list of integers", v)

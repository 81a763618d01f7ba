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

from mosaicdiff.core.config_fields import (
    FieldChecker,
    check_stage_fields,
    is_int,
    is_number,
    positive_int,
    positive_ints,
)
from mosaicdiff.core.meta_build import building_on_meta
from mosaicdiff.core.model import MosaicModel, skip_weight_init, split_rows
from mosaicdiff.core.serialization import check_common_fields
from mosaicdiff.core.shared_producers import (
    empty_shared_blocks,
    install_shared_blocks,
    share_stages,
)
from mosaicdiff.core.stages import StageSpec, coverage_problem
from mosaicdiff.core.text_blocks import CrossKVCacheMixin
from mosaicdiff.core.traced_stages import run_stage_traced
from mosaicdiff.families.unet import lora as unet_lora
from mosaicdiff.families.unet.adapter import transformer_blocks, unet_skeleton
from mosaicdiff.families.unet.blocks import (
    UNET_INDEX_FIELDS,
    CompactUNetBlock,
    CompactUNetBlockWeights,
    check_block_call,
    unet_block_shapes,
)
from mosaicdiff.families.unet.inputs import check_forward_inputs
from mosaicdiff.families.unet.producers import SharedUNetBlock, share_unet_producers

logger = logging.getLogger(__name__)

__all__ = ["MosaicUNet", "StageSwitchedChain"]


#: The ``cross_attention_kwargs`` entry that tells the chains the stage of a traced forward.
TRACED_STAGE_KEY = "mosaic_stage"


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

    def blocks(self, stage: int | None = None) -> list[CompactUNetBlock]:
        """The compact blocks this chain runs in `stage` (default the current stage)."""
        owner = self._owner
        return list(owner.stage_blocks[owner.current_stage if stage is None else stage][self.start:self.stop])

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        """``BasicTransformerBlock``'s signature; masks are not supported (None), as in `CompactUNetBlock`."""
        check_block_call(attention_mask, encoder_attention_mask, encoder_hidden_states)
        blocks = self.blocks((cross_attention_kwargs or {}).get(TRACED_STAGE_KEY))
        h = hidden_states.contiguous()
        x = blocks[0].norm1(h)
        for block, following in zip(blocks, [*blocks[1:], None]):
            h, x = block.forward_normed(h, x, encoder_hidden_states, next_block=following)
        return h

    def extra_repr(self) -> str:
        return f"blocks={self.start}..{self.stop - 1}"


class MosaicUNet(CrossKVCacheMixin, MosaicModel):
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
            kept heads or channels out of range or repeated; ``shared_producers`` of the wrong
            length or that a stage's kept lists do not fit; a stage, ``shared_producers`` entry
            or U-Net dimension of the wrong type (the field named).
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
    #: Where a dense U-Net LoRA's linears live (`mosaicdiff.core.lora`).
    _lora_targets = unet_lora.lora_targets
    #: The config fields that set each tensor's shape (loading errors name them).
    shape_fields = (
        ("unet.conv_in.", ("in_channels", "block_out_channels", "conv_in_kernel")),
        ("unet.conv_out.", ("out_channels", "block_out_channels", "conv_out_kernel")),
        ("unet.time_embedding.", ("block_out_channels", "time_embedding_dim")),
        ("unet.add_embedding.", ("projection_class_embeddings_input_dim", "addition_time_embed_dim",
                                 "block_out_channels")),
        ("unet.", ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
                   "norm_num_groups")),
        ("", ("block_out_channels", "attention_head_dim", "cross_attention_dim", "stages", "shared_producers")),
    )

    def __init__(self, unet_config: dict | None = None, stages: Sequence[dict] | None = None,
                 dense_reference: dict | None = None, meta: dict | None = None,
                 shared_producers: Sequence[dict] | None = None, **unet_keys: Any):
        super().__init__()
        from diffusers import UNet2DConditionModel

        unet_config = {**dict(unet_config or {}), **unet_keys}
        unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        need = FieldChecker("MosaicUNet")  # a bad field in one line, not an error deep in diffusers' build
        check_unet_fields(unet_config, need)
        # an empty list: the stage checks below say it in their words
        check_stage_fields(list(stages or ()), need, UNET_INDEX_FIELDS, nonempty=False)
        check_shared_producer_fields(shared_producers, need)
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
        _check_kept_units(stages, dense_blocks)
        self._eps = float(dense_blocks[0].norm1.eps)
        # a loader checking an untrusted config builds it on meta (`mosaicdiff.core.meta_build`)
        self.unet = unet_skeleton(unet).to_empty(device="meta" if building_on_meta() else "cpu")
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
        self.producer_storage, self.stage_blocks = empty_shared_blocks(
            "MosaicUNet", stages, shared_producers, SharedUNetBlock, self._block_facts, self._eps,
            what="transformer block")

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
        shared, units = share_stages(share_unet_producers, like, head_dims, share_producers, stage_cfgs)
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
        install_shared_blocks(mosaic, shared, SharedUNetBlock, head_dims, mosaic._eps)
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

        Raises:
            ValueError / TypeError: text states of another width or batch, missing or misshapen
                SDXL ``added_cond_kwargs``, a timestep outside every stage (one line each,
                `mosaicdiff.families.unet.inputs.check_forward_inputs`).
        """
        check_forward_inputs(self, sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs"))
        batch = int(sample.shape[0])
        return_dict = kwargs.pop("return_dict", True)
        if torch.compiler.is_compiling():  # no host read: the stage is chosen in the graph
            out = run_stage_traced(self, timestep, batch, sample.device, lambda stage, t: self._run_stage_unet(
                stage, sample, t, encoder_hidden_states, args, kwargs))
            return self._output(out, return_dict)
        groups = self.stage_rows(timestep, batch)
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

        return self._output(self.run_by_stage(groups, batch, run), return_dict)

    @staticmethod
    def _output(out: torch.Tensor, return_dict: bool):
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _run_stage_unet(self, stage: int, sample, timestep, encoder_hidden_states, args, kwargs) -> torch.Tensor:
        """The U-Net with `stage`'s blocks, the stage handed to the chains in
        ``cross_attention_kwargs`` (which diffusers passes down to every transformer block): a
        traced ``torch.cond`` branch must not set ``current_stage`` (dynamo keeps one branch's
        attribute writes for all branches)."""
        kwargs = {**kwargs, "cross_attention_kwargs": {**(kwargs.get("cross_attention_kwargs") or {}),
                                                       TRACED_STAGE_KEY: stage}}
        return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs, return_dict=False)[0]

    def forward_stage(self, stage: int, sample: torch.Tensor, timestep: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor | None = None,
                      time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-capturable forward of one stage: tensors only, no host reads."""
        self.current_stage = stage
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

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

    # enable_cross_kv_cache, enable_cuda_graphs (which switches that cache off): `CrossKVCacheMixin`

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
        check_unet_fields(config, need)
        check_shared_producer_fields(config.get("shared_producers"), need)


#: U-Net config keys that are dimensions: a positive integer, or (the per-level ones) a list of them.
_SIZES = ("in_channels", "out_channels", "conv_in_kernel", "conv_out_kernel")
_OPTIONAL_SIZES = ("norm_num_groups", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                   "time_embedding_dim", "num_attention_heads")
_PER_LEVEL_SIZES = ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                    "sample_size")


def check_unet_fields(config: dict[str, Any], need: FieldChecker) -> None:
    """The dimensions of a ``UNet2DConditionModel`` config (those present; diffusers' defaults
    otherwise); its other keys are diffusers' to check (`MosaicUNet` says which failed)."""
    for key in _SIZES:
        if key in config:
            need(positive_int(config[key]), key, "a positive integer", config[key])
    for key in _OPTIONAL_SIZES:
        if key in config:
            need(config[key] is None or positive_ints(config[key]), key, "null or a positive integer",
                 config[key])
    for key in _PER_LEVEL_SIZES:
        if key in config:
            need(positive_ints(config[key]), key, "a positive integer or a list of them", config[key])
    if "transformer_layers_per_block" in config:
        layers = config["transformer_layers_per_block"]
        flat = [x for v in layers for x in (v if isinstance(v, (list, tuple)) else [v])] \
            if isinstance(layers, (list, tuple)) else [layers]
        need(len(flat) > 0 and all(positive_int(x) for x in flat), "transformer_layers_per_block",
             "a positive integer or a list of them (per level, or per block)", layers)
    if "norm_eps" in config:
        need(is_number(config["norm_eps"]) and config["norm_eps"] > 0, "norm_eps", "a positive number",
             config["norm_eps"])


def check_shared_producer_fields(shared: Any, need: FieldChecker) -> None:
    """``shared_producers``: null, or one object per block with integer lists ``heads1``,
    ``heads2`` and ``channels``."""
    need(shared is None or isinstance(shared, (list, tuple)), "shared_producers", "null or a list", shared)
    for j, p in enumerate(shared or []):
        for key in ("heads1", "heads2", "channels"):
            v = p.get(key) if isinstance(p, dict) else None
            need(isinstance(v, (list, tuple)) and all(is_int(x) for x in v), f"shared_producers[{j}].{key}",
                 "a list of integers", v)


def _check_kept_units(stages: list[dict], dense_blocks: list[nn.Module]) -> None:
    """Every stage's kept heads and channels are distinct units of its block."""
    limits = [(b.attn1.heads, b.attn2.heads, b.ff.net[2].in_features) for b in dense_blocks]
    for spec in stages:
        for j, (kept, block_limits) in enumerate(zip(spec["blocks"], limits)):
            for key, limit in zip(UNET_INDEX_FIELDS, block_limits):
                idx = list(kept[key])
                if any(not 0 <= i < limit for i in idx) or len(set(idx)) != len(idx):
                    raise ValueError(f"stage {spec['name']!r} block {j}: {key} must be distinct indices in "
                                     f"[0, {limit}), got {idx if len(idx) <= 8 else idx[:8] + ['...']}")

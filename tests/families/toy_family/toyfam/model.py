"""The toy family's mosaic: the shared embedding, and per stage its compact MLP blocks.

With shared producers every block position stores fc1's rows once, in an order where each stage's
kept channels are one contiguous run (`mosaicdiff.method.producer_layout`); a stage's block reads
its rows as a view and owns only its compensated fc2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from mosaicdiff.core.gemm import FP8GemmMixin, SharedProducerRowsMixin
from mosaicdiff.core.model import MosaicModel
from mosaicdiff.core.stages import check_stage_ranges, frozen
from mosaicdiff.method.producer_layout import interval_order, unit_ranges
from toyfam.dense import ToyEmbedding


class ToyProducers(nn.Module):
    """fc1 rows of one block position, stored once for every stage."""

    fp8_weights = ("fc1_weight",)  # what `mosaicdiff.quantize` stores as float8

    def __init__(self, channels: list[int], width: int):
        super().__init__()
        self.channels = list(channels)
        self.fc1_weight = frozen(torch.empty(len(channels), width))
        self.fc1_bias = frozen(torch.empty(len(channels)))


class CompactToyBlock(FP8GemmMixin, nn.Module):
    """A stage's MLP block; its GEMMs run in the weights' storage (float8 after `mosaicdiff.quantize`)."""

    fp8_weights = ("fc1_weight", "fc2_weight")

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc2_weight = frozen(torch.empty(width, channels))
        self.fc2_bias = frozen(torch.empty(width))
        self.fc1_weight = frozen(torch.empty(channels, width))
        self.fc1_bias = frozen(torch.empty(channels))

    def forward(self, h, cond):
        f = F.gelu(self.producer_gemm("fc1", self.norm(h) + cond))
        return h + self.own_gemm("fc2", f)


class SharedToyBlock(SharedProducerRowsMixin, CompactToyBlock):
    """A block whose fc1 rows are a row range of the position's `ToyProducers`."""

    fp8_weights = ("fc2_weight",)

    def __init__(self, width: int, producers: ToyProducers, rows: tuple[int, int]):
        nn.Module.__init__(self)
        self.norm = nn.LayerNorm(width)
        self.fc2_weight = frozen(torch.empty(width, rows[1] - rows[0]))
        self.fc2_bias = frozen(torch.empty(width))
        object.__setattr__(self, "_producers", producers)  # a reference, not a submodule: saved once
        self.rows = rows

    def _producer_rows(self, name):
        return [slice(*self.rows)]


class MosaicToy(MosaicModel):
    format_name = "toyfam.MosaicToy"
    format_version = "1.0"
    readable_majors = (1,)

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 8, width: int = 32, mlp: int = 96,
                 num_layers: int = 2, num_classes: int = 10, stages: list | None = None,
                 shared_producers: list | None = None, dense_reference: dict | None = None, meta: dict | None = None):
        super().__init__()
        stages = list(stages or [])
        check_stage_ranges(stages, "MosaicToy")
        self.embed = ToyEmbedding(in_channels, width, num_classes)
        self.producer_storage = None
        if shared_producers is None:
            self.stage_blocks = nn.ModuleList(nn.ModuleList(CompactToyBlock(width, len(b["kept"])) for b in s["blocks"])
                                              for s in stages)
        else:
            self.producer_storage = nn.ModuleList(ToyProducers(c, width) for c in shared_producers)
            self.stage_blocks = nn.ModuleList(nn.ModuleList() for _ in stages)
            for j, store in enumerate(self.producer_storage):
                ranges = unit_ranges(store.channels, [s["blocks"][j]["kept"] for s in stages])
                for i, (a, b) in enumerate(ranges):
                    self.stage_blocks[i].append(SharedToyBlock(width, store, (a, b)))
        self._init_stages(stages)

    @classmethod
    def from_dense(cls, dense, stages, *, source=None, meta=None, share_producers=None):
        kept = [[w.kept.tolist() for w in s.blocks] for s in stages]
        orders = [interval_order([k[j] for k in kept]) for j in range(len(kept[0]))]
        share = share_producers is not False and all(o is not None for o in orders)
        if share_producers and not share:
            raise ValueError("share_producers=True: the stages' kept channels cannot share one storage")
        if share:  # each stage's kept list in storage order
            kept = [[sorted(k[j], key=orders[j].index) for j in range(len(k))] for k in kept]
        cfg = {k: dense.config[k] for k in ("in_channels", "sample_size", "width", "mlp", "num_layers", "num_classes")}
        stage_cfgs = [{"name": s.name, "t_start": s.t_start, "t_end": s.t_end, "sparsity": s.sparsity,
                       "blocks": [{"kept": k} for k in ks]} for s, ks in zip(stages, kept)]
        mosaic = cls(**cfg, stages=stage_cfgs, shared_producers=orders if share else None,
                     dense_reference=cls.dense_reference_of(dense), meta={**(meta or {}), "source": source})
        with torch.no_grad():
            mosaic.embed.load_state_dict(dense.embed.state_dict())
            for i, s in enumerate(stages):
                for j, (w, dense_block) in enumerate(zip(s.blocks, dense.blocks)):
                    block = mosaic.stage_blocks[i][j]
                    perm = [w.kept.tolist().index(c) for c in kept[i][j]]  # pruner order -> stored order
                    block.norm.load_state_dict(dense_block.norm.state_dict())
                    block.fc2_weight.copy_(w.fc2_weight[:, perm])
                    block.fc2_bias.copy_(w.fc2_bias)
                    if share:
                        store, (a, b) = mosaic.producer_storage[j], block.rows
                        store.fc1_weight[a:b] = w.fc1_weight[perm]
                        store.fc1_bias[a:b] = w.fc1_bias[perm]
                    else:
                        block.fc1_weight.copy_(w.fc1_weight[perm])
                        block.fc1_bias.copy_(w.fc1_bias[perm])
        return mosaic.eval()

    def _memory_skeleton(self):
        return self.embed

    def forward_stage(self, stage, hidden_states, timestep, class_labels):
        b, c, hgt, wid = hidden_states.shape
        h = self.embed.proj_in(hidden_states.permute(0, 2, 3, 1).reshape(b, hgt * wid, c))
        cond = self.embed.condition(timestep, class_labels, h.dtype)
        for block in self.stage_blocks[stage]:
            h = block(h, cond)
        return self.embed.proj_out(h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)

    def forward(self, hidden_states, timestep, class_labels, return_dict: bool = True):
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)

        def run(stage, rows):
            args = (hidden_states, t, class_labels)
            if rows is not None:
                args = tuple(a[rows] for a in args)
            return self.forward_stage(stage, *args)

        out = self.run_by_stage(self.stage_rows(timestep, batch), batch, run)
        return (out,) if not return_dict else {"sample": out}

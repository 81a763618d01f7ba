r"""The model adapter interface: everything the method needs to know about a model family.

The method (`mosaicdiff.method.calibrate`, `mosaicdiff.method.compact`, `mosaicdiff.method.pruning`) never looks
inside a model; it asks the model's `ModelAdapter`:

- where the prunable blocks are (`ModelAdapter.blocks`);
- which structured units each block has (`ModelAdapter.groups`): for each group of units that
  is removed together (the heads of one attention, the channels of one MLP) the *consumer*
  linear that reads them as input columns (OBS compensates it), the *producer* linears that
  write them as output rows (sliced), and how many columns one unit is (``head_dim`` or 1);
- how to run the model on calibration inputs with their conditioning (`ModelAdapter.run`);
- how to turn a block and its pruned groups into the runtime's compact block
  (`ModelAdapter.compact_block`, `ModelAdapter.dense_block`) and how to build the shared
  skeleton (`ModelAdapter.shared_skeleton`).

`docs/adding_a_model.md` walks through writing one (with the SDXL U-Net as the example).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["GROUP_KINDS", "ModelAdapter", "PrunableGroup", "PrunedGroup", "hessian_keys", "linear_bias", "unwrap_model"]

#: How a sparsity becomes a number of removed units: "heads" rounds to the nearest head and
#: always keeps one; "channels" keeps a width aligned to a multiple (`mosaicdiff.method.compact`).
GROUP_KINDS = ("heads", "channels")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Looks through ``torch.compile`` wrappers (``_orig_mod``) to the real module."""
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


def linear_bias(linear: nn.Linear) -> torch.Tensor:
    """The bias of `linear` (detached), or zeros when it has none."""
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


@dataclass(frozen=True)
class PrunableGroup:
    """Units of one block removed together: the heads of one attention or the channels of one MLP.

    Attributes:
        kind: one of `GROUP_KINDS`.
        consumer: the linear reading the units as groups of `unit_size` input columns
            (attention ``to_out[0]``, MLP ``fc2``); OBS removes its columns and compensates.
        producers: the linears writing the units as output rows (``to_q/k/v``, ``fc1``); their
            rows of the removed units are dropped.
        unit_size: input columns of `consumer` per unit (``head_dim`` for heads, 1 for channels).
        producer_rows: maps the group's kept columns (counted from the group's first column) to
            each producer's kept rows; default the same indices. A GEGLU MLP (value and gate halves
            in one linear) maps ``c`` to ``[c, c + F]``.
        consumer_offset: the group's first input column of `consumer`, for a consumer that reads
            several groups side by side (Flux's single-stream ``proj_out`` reads ``[attention |
            MLP]``: the MLP group starts at the attention width). Groups sharing one consumer are
            pruned in order on one compensated weight (`mosaicdiff.method.compact.prune_groups`).
        units: the group's number of units when it does not span the rest of `consumer`'s inputs
            (default ``(consumer.in_features - consumer_offset) // unit_size``).
        more_consumers: further linears reading the same units at the same columns (joint
            attention's ``to_add_out`` beside ``to_out[0]``): a unit's OBS cost is the sum over all
            consumers, each compensated with its own input Hessian.
    """

    kind: str
    consumer: nn.Linear
    producers: tuple[nn.Linear, ...]
    unit_size: int = 1
    producer_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    consumer_offset: int = 0
    units: int | None = None
    more_consumers: tuple[nn.Linear, ...] = ()

    def __post_init__(self):
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"PrunableGroup.kind must be one of {GROUP_KINDS}, got {self.kind!r}")
        span = self.consumer_offset + self.num_units * self.unit_size
        if self.consumer_offset < 0 or self.num_units < 1 or span > self.consumer.in_features:
            raise ValueError(f"PrunableGroup: columns [{self.consumer_offset}, {span}) do not fit the consumer's "
                             f"{self.consumer.in_features} input columns")
        for other in self.more_consumers:
            if other.in_features != self.consumer.in_features:
                raise ValueError(f"PrunableGroup: more_consumers must read as many columns as the consumer "
                                 f"({self.consumer.in_features}), got {other.in_features}")

    @property
    def num_units(self) -> int:
        if self.units is not None:
            return int(self.units)
        return (self.consumer.in_features - self.consumer_offset) // self.unit_size

    @property
    def consumers(self) -> tuple[nn.Linear, ...]:
        """Every consumer: `consumer` first, then `more_consumers`."""
        return (self.consumer, *self.more_consumers)

    @property
    def columns(self) -> slice:
        """The group's input columns in each consumer."""
        return slice(self.consumer_offset, self.consumer_offset + self.num_units * self.unit_size)


def hessian_keys(name: str, group: PrunableGroup) -> list[str]:
    """The keys of a group's consumers' Hessians in `collect_hessians`' output, in `consumers` order:
    the group's name for `consumer`, ``"<name>:<i>"`` for ``more_consumers[i - 1]``."""
    return [name] + [f"{name}:{i}" for i in range(1, len(group.more_consumers) + 1)]


@dataclass
class PrunedGroup:
    """The result of pruning one `PrunableGroup` (tensors in the block's dtype and device).

    Attributes:
        kept: sorted int64 indices of the kept units.
        consumer_weight: the compensated consumer weight, kept columns only.
        consumer_bias: the consumer's bias (unchanged: removing inputs does not touch it).
        producer_weights / producer_biases: each producer's kept rows, in `producers` order.
        more_consumer_weights / more_consumer_biases: the same for `PrunableGroup.more_consumers`.

    For a consumer shared by several groups, `consumer_weight` is the consumer's final compensated
    weight (after every group on it was pruned) restricted to this group's kept columns.
    """

    kept: torch.Tensor
    consumer_weight: torch.Tensor
    consumer_bias: torch.Tensor
    producer_weights: list[torch.Tensor]
    producer_biases: list[torch.Tensor]
    more_consumer_weights: list[torch.Tensor] = field(default_factory=list)
    more_consumer_biases: list[torch.Tensor] = field(default_factory=list)


class ModelAdapter(ABC):
    """What the method needs to know about one model family; one instance serves every model of it."""

    #: Short name of the family (logs, errors).
    name: str = ""

    @abstractmethod
    def handles(self, model: nn.Module) -> bool:
        """Whether `model` (already unwrapped) belongs to this family (a class check, no deep checks)."""

    @abstractmethod
    def validate(self, model: nn.Module) -> None:
        """Raise ValueError naming what is unsupported (block class, attention kind, activation)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The prunable blocks, in the order the compact blocks are stored."""

    @abstractmethod
    def groups(self, block: nn.Module) -> Mapping[str, PrunableGroup]:
        """The block's prunable groups by name; the names key the Hessians (`collect_hessians`)."""

    def run(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Mapping[str, Any]) -> Any:
        """One forward of the dense model on a calibration batch: ``model(hidden_states=x_t, timestep=t, **condition)``.

        `condition` holds the batch's conditions (`mosaicdiff.calibrate.ConditionedCalibration`):
        the forward's keyword arguments, tensors on the model's device and floating ones in its
        dtype. The default fits diffusers transformers (DiT, PixArt, SD3); override it for a
        forward that names its inputs otherwise (the U-Net's ``sample``) or scales them (Flux's
        timestep / 1000). Only the forward's effect on the Hessian hooks counts; the output is
        not used.
        """
        if not isinstance(condition, Mapping):
            raise TypeError(f"{type(self).__name__}.run: condition must be a dict of the forward's keyword "
                            f"arguments, got {type(condition).__name__}")
        return model(hidden_states=x_t, timestep=t, **condition)

    @abstractmethod
    def check_calibration(self, model: nn.Module, calibration: Any) -> None:
        """Check a `ConditionedCalibration` against the model before any long work: the condition
        keys the family needs, the latents' shape, the null conditions. Raise TypeError for a
        calibration of another kind (keys of another family), ValueError for data that does not fit."""

    def default_null_conditions(self, model: nn.Module, calibration: Any) -> Mapping[str, Any] | None:
        """The classifier-free-guidance branch's conditions when a calibration has none (the null
        class, zero text states), or None: the family has no obvious one and users must pass them.
        A family may raise ValueError instead, to say in its own words what to pass (PixArt: the
        negative prompt's T5 embedding)."""
        return None

    @abstractmethod
    def dense_block(self, block: nn.Module) -> Any:
        """The runtime's compact block weights of an unpruned block (nothing removed)."""

    @abstractmethod
    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> Any:
        """The runtime's compact block weights from the block and its pruned groups."""

    @abstractmethod
    def block_widths(self, block: nn.Module, weights: Any) -> dict[str, float]:
        """Kept widths and realised sparsities of one compact block, for the mosaic's ``meta``
        (keys ending in ``_sparsity`` are averaged over the sampling steps)."""

    @abstractmethod
    def shared_skeleton(self, model: nn.Module) -> nn.Module:
        """The un-pruned parameters every stage shares (embeddings, conditioning, output layer), copied."""

    def default_scheduler(self):
        """The scheduler the family samples with by default (its training noise schedule)."""
        from mosaicdiff.core.schedulers import default_scheduler

        return default_scheduler()

    def noise_process(self, model: nn.Module, scheduler, calibration: Any = None):
        """The forward process `scheduler` samples on (`mosaicdiff.core.schedulers.noise_process`).

        A family whose pipeline sets the sampler from the image size (Flux's dynamic shift) derives
        what the scheduler alone does not say from the calibration latents."""
        from mosaicdiff.core.schedulers import noise_process

        return noise_process(scheduler)

    def source_name(self, model: nn.Module) -> str:
        """Where the model came from (hub id or path) if its config says so, else its class name."""
        inner = unwrap_model(model)
        config = getattr(inner, "config", None)
        source = getattr(config, "_name_or_path", None) if config is not None else None
        return source or type(inner).__name__

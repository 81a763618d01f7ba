"""`MosaicModel`: what every family's stage-switching model shares, written once.

A family's mosaic (`mosaicdiff.families.dit.model.MosaicDiT`, `...unet.model.MosaicUNet`) is a
diffusers model (``ModelMixin`` + ``ConfigMixin``) whose config lists its ``stages`` (name, timestep
range, sparsity, kept units per block), ``shared_producers``, ``dense_reference`` and ``meta``
beside the dense model's own keys. This base gives every family:

- the stage table: `stage_ranges`, `stage_for` (one semantics: a number, or a tensor whose values
  all fall in one stage) and `stage_rows` (per-row stages of a mixed batch, `run_by_stage`);
- `memory_report` (one schema: parameters and bytes, shared storage counted once);
- crash-safe save/load through one serializer (`mosaicdiff.core.serialization`), with the format
  name, version and upgrades of old folders as class hooks;
- CUDA graphs and per-stage kernel configs (`mosaicdiff.core.runtime.StageRuntimeMixin`);
- ``torch.compile(mosaic, fullgraph=True)``: a family's forward chooses the stage in the graph
  when traced (`mosaicdiff.core.traced_stages.run_stage_traced`: one graph for every stage with a
  tensor timestep, one per stage with a Python number);
- what diffusers' model tests expect of a ``ModelMixin`` (``tests/families/test_diffusers_behaviour.py``):
  a model built from its config (``MosaicX(**mosaic.config)``) has initialised weights, as a
  diffusers constructor gives (`mosaicdiff.core.weight_init`; skipped while loading or converting, which assign
  the real weights: `skip_weight_init`); ``save_pretrained(variant=..., max_shard_size=...)`` and
  ``from_pretrained(variant=...)``; ``enable_layerwise_casting`` reaching the compact blocks and the
  shared producer storage; ``compile_repeated_blocks`` compiling the compact blocks' entry points;
  and a forward that runs in the weights' dtype inside an autocast region.

A family writes its constructor (skeleton from the config, calling `_init_stages` last), ``from_dense``
(building the model under `skip_weight_init`), its compact blocks and its forward.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mosaicdiff.core import layerwise_casting, quantize
from mosaicdiff.core.lora import MosaicLoraMixin
from mosaicdiff.core.runtime import StageRuntimeMixin
from mosaicdiff.core.stages import StageSpec, stage_index
from mosaicdiff.core.weight_init import init_weights, skip_weight_init, weight_init_skipped

logger = logging.getLogger(__name__)

__all__ = ["MosaicModel", "skip_weight_init", "split_rows"]

def _host_values(t: Any) -> list[float]:
    """Timestep(s) as host floats: one read of a device tensor, none of a number or CPU tensor."""
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().reshape(-1).double().cpu().tolist()]
    if isinstance(t, (int, float)) or hasattr(t, "__float__"):
        return [float(t)]
    raise TypeError(f"a timestep must be a number or a tensor, got {type(t).__name__}")


def split_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` with every tensor whose first dimension is `batch` taken at `rows` (nested dicts,
    lists and tuples followed); anything else (per-run tensors, numbers, None) passed as is."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: split_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(split_rows(v, rows, batch) for v in value)
    return value


class MosaicModel(MosaicLoraMixin, StageRuntimeMixin, ModelMixin, ConfigMixin):
    """Base of the stage-switching models; see the module docstring."""

    config_name = "config.json"
    #: The saved folder's ``format`` (`mosaicdiff.core.serialization`): one per family.
    format_name: ClassVar[str] = ""
    #: ``"MAJOR.MINOR"`` written by this package; majors in `readable_majors` are read.
    format_version: ClassVar[str] = "1.0"
    readable_majors: ClassVar[tuple[int, ...]] = (1,)
    #: `mosaicdiff.prune` stores the stages' producers once by default.
    shares_producers: ClassVar[bool] = True
    #: ``(state-dict name prefix, config fields)``: which fields set the shape of the tensors (or
    #: derived buffers) under a prefix, first match; loading errors name them (family hook).
    shape_fields: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()

    # ------------------------------------------------------------------ the stage table

    def _init_stages(self, stages: Sequence[dict]) -> None:
        """Read the stage table from the config's stages and initialise the weights (call last in
        the family's ``__init__``, once every module exists)."""
        self._ranges = [(s["name"], int(s["t_start"]), int(s["t_end"]), float(s["sparsity"])) for s in stages]
        self._init_stage_runtime()
        if not weight_init_skipped():
            init_weights(self)

    #: The dense model's config keys the mosaic's config repeats (family hook, read by `dense_config`).
    dense_config_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def dense_config(self) -> dict[str, Any]:
        """The dense model's config this mosaic was pruned from (its `dense_config_keys`)."""
        return {k: self.config[k] for k in self.dense_config_keys}

    @property
    def stages(self) -> list[StageSpec]:
        """The stages, their blocks' tensors being this module's (a shared-producer block's rows re-laid
        out in the copies layout: copies)."""
        return [StageSpec(name, t0, t1, sp, [b.weights() for b in self.stage_blocks[i]])
                for i, (name, t0, t1, sp) in enumerate(self._ranges)]

    @property
    def meta(self) -> dict[str, Any]:
        """How the mosaic was made (``config.meta``)."""
        return dict(self.config.meta) if self.config.meta is not None else {}

    @property
    def num_stages(self) -> int:
        return len(self._ranges)

    @property
    def stage_names(self) -> list[str]:
        return [r[0] for r in self._ranges]

    @property
    def stage_ranges(self) -> list[tuple[str, int, int, float]]:
        """``(name, t_start, t_end, sparsity)`` per stage, in storage order."""
        return list(self._ranges)

    def stage_for(self, t: float | int | torch.Tensor) -> int:
        """Index of the stage whose range ``[t_start, t_end)`` contains timestep `t`.

        `t` is a number or a tensor of any shape whose values all fall in one stage (a batch at
        one denoising step). A batch whose rows fall in several stages is run by `stage_rows`.

        Raises:
            ValueError: no stage contains a value, or the values span several stages.
        """
        values = _host_values(t)
        if not values:
            raise ValueError("stage_for: got an empty timestep tensor")
        stages = {stage_index(self._ranges, v) for v in (min(values), max(values))}
        if len(stages) > 1:
            names = [self._ranges[i][0] for i in sorted(stages)]
            raise ValueError(f"stage_for: the timesteps span stages {names} (min t={min(values):g}, "
                             f"max t={max(values):g}); use stage_rows for a mixed batch")
        return stages.pop()

    def stage_rows(self, t: float | int | torch.Tensor, batch: int) -> list[tuple[int, torch.Tensor | None]]:
        """The stages of a batch's rows: ``[(stage, rows)]`` in stage order, ``rows`` a CPU int64
        index tensor, or None when every row is in that one stage (the common case: no split).

        Raises:
            ValueError: a value outside every stage, or a timestep tensor with neither 1 nor
                `batch` entries.
        """
        values = _host_values(t)
        if len(values) not in (1, batch):
            raise ValueError(f"timestep must be a number or have 1 or {batch} entries (one per row), "
                             f"got {len(values)}")
        if len(set(values)) == 1:  # every sampler's batch: one lookup
            return [(stage_index(self._ranges, values[0]), None)]
        per_row = [stage_index(self._ranges, v) for v in values]
        if len(set(per_row)) == 1:
            return [(per_row[0], None)]
        return [(s, torch.tensor([i for i, r in enumerate(per_row) if r == s], dtype=torch.int64))
                for s in sorted(set(per_row))]

    @staticmethod
    def run_by_stage(groups: list[tuple[int, torch.Tensor | None]], batch: int,
                     run: Callable[[int, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """``run(stage, rows)`` per stage group and the outputs put back in row order.

        ``run`` gets ``rows=None`` for a batch in one stage (and returns the whole output), else
        the index of its rows (and returns their outputs, first dimension ``len(rows)``).
        """
        if len(groups) == 1 and groups[0][1] is None:
            return run(groups[0][0], None)
        out = None
        for stage, rows in groups:
            part = run(stage, rows)
            if out is None:
                out = part.new_empty((batch, *part.shape[1:]))
            out[rows.to(part.device)] = part
        return out

    # ------------------------------------------------------------------ memory

    def _memory_skeleton(self) -> nn.Module:
        """The un-pruned modules every stage shares (family hook)."""
        raise NotImplementedError

    def _dense_params_dedup(self, dense: dict[str, Any]) -> int:
        """The dense model's parameters with duplicated modules counted once (family hook)."""
        return int(dense.get("params") or 0)

    def memory_report(self) -> dict[str, Any]:
        """Parameter counts and bytes of the mosaic against the dense model it came from.

        Tensors sharing storage are counted once (a shared-producer mosaic's stages hold views of
        one storage per block). Non-persistent buffers are excluded on both sides.

        Returns:
            `dict` with ``shared_params``, ``shared_bytes`` (the skeleton), ``producer_params``,
            ``producer_bytes`` (the shared producer storage, 0 without one), ``stages`` (name ->
            params, bytes, sparsity: what the stage stores on its own), ``mosaic_params``,
            ``mosaic_bytes``, ``dense_params``, ``dense_bytes`` (dtype at construction),
            ``dense_dtype``, ``dense_bytes_same_dtype`` (dense params at the mosaic's element
            size), ``ratio`` (``mosaic_bytes / dense_bytes_same_dtype``), ``dense_params_dedup``
            (the dense model with duplicated modules once, e.g. DiT's per-block embedders),
            ``ratio_dedup`` (against that) and ``graph_bytes`` (stage name -> device bytes its
            captured CUDA graphs added, `mosaicdiff.core.graphs`; 0 where none was captured; not
            part of ``mosaic_bytes``, which counts the weights).
        """
        seen: set[tuple[int, int]] = set()

        def count(module: nn.Module | None) -> tuple[int, int]:
            n = b = 0
            for p in module.parameters() if module is not None else ():
                key = (id(p), 0) if p.device.type == "meta" else (p.untyped_storage().data_ptr(), p.storage_offset())
                if key not in seen:
                    seen.add(key)
                    n, b = n + p.numel(), b + p.numel() * p.element_size()
            return n, b

        skeleton = self._memory_skeleton()
        shared_n, shared_b = count(skeleton)
        prod_n, prod_b = count(self.producer_storage)
        stages, total_n, total_b = {}, shared_n + prod_n, shared_b + prod_b
        for (name, _, _, sp), blocks in zip(self._ranges, self.stage_blocks):
            n, b = count(blocks)
            stages[name] = {"params": n, "bytes": b, "sparsity": sp}
            total_n, total_b = total_n + n, total_b + b
        dense = {"params": 0, "bytes": 0, "dtype": None, **(self.config.dense_reference or {})}
        floating = [p for p in self.parameters() if p.is_floating_point()]
        element = floating[0].element_size() if floating else 4
        dense_same = int(dense["params"]) * element
        dedup = self._dense_params_dedup(dense)
        return {
            "shared_params": shared_n, "shared_bytes": shared_b, "producer_params": prod_n, "producer_bytes": prod_b,
            "stages": stages, "mosaic_params": total_n, "mosaic_bytes": total_b,
            "dense_params": int(dense["params"]), "dense_bytes": int(dense["bytes"] or 0),
            "dense_dtype": dense["dtype"],
            "dense_bytes_same_dtype": dense_same, "ratio": total_b / dense_same if dense_same else math.nan,
            "dense_params_dedup": dedup, "ratio_dedup": total_b / (dedup * element) if dedup else math.nan,
            "graph_bytes": self._graph_bytes_per_stage(),
        }

    def _graph_bytes_per_stage(self) -> dict[str, int]:
        """Stage name -> device bytes of its captured CUDA graphs (0 without graphs)."""
        runner = getattr(self, "_graphs", None)
        per_index = runner.bytes_per_stage() if runner is not None else {}
        return {name: int(per_index.get(i, 0)) for i, name in enumerate(self.stage_names)}

    @staticmethod
    def dense_reference_of(dense: nn.Module, **extra: Any) -> dict[str, Any]:
        """The ``dense_reference`` config entry of a dense model: params, bytes, dtype (and `extra`)."""
        params = list(dense.parameters())
        return {"params": int(sum(p.numel() for p in params)),
                "bytes": int(sum(p.numel() * p.element_size() for p in params)),
                "dtype": str(params[0].dtype).removeprefix("torch.") if params else None, **extra}

    # ------------------------------------------------------------------ diffusers model behaviour

    def __call__(self, *args, **kwargs):
        """The forward, run in the weights' dtype even inside an autocast region.

        The fused ops take one dtype (activations, weights and biases alike) and the stage blocks
        chain them, so autocast, which would hand them half-precision GEMM outputs next to float32
        weights, is switched off for the mosaic's forward; cast the model (``.to(dtype)``,
        ``from_pretrained(torch_dtype=...)``) or use `enable_layerwise_casting` for lower precision.
        The output has the weights' dtype; the code around the call stays under autocast.
        """
        devices = layerwise_casting.autocast_devices()
        if not devices:
            return super().__call__(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return super().__call__(*args, **kwargs)

    def _compact_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every producer storage and compact block, storages first."""
        out = []
        if getattr(self, "producer_storage", None) is not None:
            out += [(f"producer_storage.{j}", m) for j, m in enumerate(self.producer_storage)]
        for i, blocks in enumerate(self.stage_blocks):
            out += [(f"stage_blocks.{i}.{j}", m) for j, m in enumerate(blocks)]
        return out

    #: The methods of a compact block through which the stage runtime reads its weights.
    _compact_entry_points: ClassVar[tuple[str, ...]] = ("forward", "forward_normed", "norm1")

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None,
                                 skip_modules_pattern: tuple[str, ...] | None = None,
                                 skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
                                 non_blocking: bool = False) -> None:
        """diffusers' layerwise casting over the compact blocks and the shared producer storage too
        (`mosaicdiff.core.layerwise_casting.enable_layerwise_casting`, which says how).

        Raises:
            RuntimeError: on a quantized mosaic (`mosaicdiff.quantize`: its weights are float8 already).
        """
        if quantize.quantized_keys(self):
            raise RuntimeError(f"{type(self).__name__}: enable_layerwise_casting on a quantized mosaic; its GEMM weights "
                               f"are float8 already (mosaicdiff.quantize)")
        layerwise_casting.enable_layerwise_casting(self, storage_dtype, compute_dtype, skip_modules_pattern,
                                                   skip_modules_classes, non_blocking)

    def to(self, *args, **kwargs):
        """`ModelMixin.to`; on a quantized mosaic (`mosaicdiff.quantize`) the float8 weights and their
        fp32 scales keep their dtype (`mosaicdiff.core.quantize.cast_unquantized`)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None or not quantize.quantized_keys(self):
            return super().to(*args, **kwargs)
        return quantize.cast_unquantized(self, device, dtype, non_blocking)

    def enable_cuda_graphs(self, enabled: bool = True):
        if enabled and self.__dict__.get("_layerwise_casting"):
            raise RuntimeError(f"{type(self).__name__}: CUDA graphs cannot replay a layerwise-cast model (casting "
                               f"moves the weights at every call)")
        return super().enable_cuda_graphs(enabled)

    enable_cuda_graphs.__doc__ = StageRuntimeMixin.enable_cuda_graphs.__doc__

    def compile_repeated_blocks(self, *args, **kwargs) -> None:
        """Regional compilation (diffusers' ``compile_repeated_blocks``): every module whose class
        is in `_repeated_blocks` gets its call compiled and, for a compact block, also the
        ``forward_normed`` the fused stage runtime calls instead (diffusers would compile the call
        only, which the runtime never makes). Arguments go to ``torch.compile``.

        Raises:
            ValueError: `_repeated_blocks` is empty or names no module of the model.
        """
        repeated = tuple(self._repeated_blocks or ())
        if not repeated:
            raise ValueError(f"{type(self).__name__}: `_repeated_blocks` is empty")
        found = False
        for module in self.modules():
            if type(module).__name__ in repeated:
                module.compile(*args, **kwargs)
                if callable(getattr(module, "forward_normed", None)):
                    module.forward_normed = torch.compile(module.forward_normed, *args, **kwargs)
                found = True
        if not found:
            raise ValueError(f"{type(self).__name__}: no module of the classes {list(repeated)} to compile")

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, reading a saved config.json as is (its file keys are dropped)."""
        from mosaicdiff.core.serialization import ENVELOPE_KEYS

        config = {k: v for k, v in dict(config or {}).items() if k not in ENVELOPE_KEYS}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def upgrade_saved_config(cls, config: dict[str, Any], cfg_path, major: int) -> dict[str, Any]:
        """A config of an older format major as this version reads it (family hook; default as is)."""
        return config

    @classmethod
    def upgrade_saved_tensors(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of an upgraded folder under this version's names (family hook; default as is)."""
        return tensors

    @classmethod
    def check_saved_config(cls, config: dict[str, Any], cfg_path) -> None:
        """Family checks of a saved config's fields beyond the common ones (hook; ValueError naming
        the file and the field)."""

    def save_pretrained(self, save_directory, *, variant: str | None = None,
                        max_shard_size: int | str | None = None, **kwargs) -> None:
        """Save as ``config.json`` + ``model.safetensors``, crash-safely (`mosaicdiff.core.serialization`).

        diffusers' own save writes in place (a crash leaves a torn folder); this one keeps the
        folder's other files and leaves the old or the new model, never a mix. diffusers' other
        keyword arguments (``safe_serialization``, ...) are accepted and ignored: the format is fixed.

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if missing).
            variant (`str`, *optional*): save the weights as this variant, ``model.<variant>.safetensors``
                (diffusers' naming; ``from_pretrained(variant=...)`` reads it). The folder's other
                variants are kept when the config is unchanged.
            max_shard_size (`int` or `str`, *optional*): split the weights into files of at most
                this size (``"5GB"``, ``"500MB"``, bytes) with an index, as diffusers shards; None
                (default): one file.

        Raises:
            FileExistsError / PermissionError: the folder is a file, holds another kind of model,
                or is not writable (see `mosaicdiff.core.model_folder.validate_save_directory`).
            BlockingIOError: another save into the same folder is in progress.
            ValueError: the stages do not cover the timesteps (the folder could not be loaded), or
                an invalid `variant` / `max_shard_size`.
            OSError: writing failed (e.g. disk full); the folder is left as it was.
        """
        from mosaicdiff.core.serialization import save_model

        save_model(self, save_directory, variant=variant, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, directory, *, device: torch.device | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, variant: str | None = None, **kwargs):
        """Load a folder written by `save_pretrained` (this format or an older readable one).

        The config builds the skeleton on the meta device (nothing allocated) and the weights'
        safetensors headers are checked against it key by key, shape by shape and dtype by dtype
        (a config that does not fit its weights costs no memory); only then are the weights read
        and assigned to the skeleton built for real (no copy). Sharded
        weights (an index and its shards) are read as one. diffusers' ``device_map`` is read as
        `device`, ``dtype`` as `torch_dtype`, ``subfolder`` is joined to the folder; the loading
        options diffusers pipelines pass (``low_cpu_mem_usage``, ``use_safetensors``, ...) are
        accepted and have no effect here.

        Args:
            directory (`str` or `os.PathLike`): the saved mosaic.
            device (`torch.device` or `str`, *optional*): where to put the weights.
            torch_dtype (`torch.dtype` or `str`, *optional*): cast the weights to this dtype
                (``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"``, ``"float32"``/``"fp32"``).
            variant (`str`, *optional*): read the weights saved with ``save_pretrained(variant=...)``.

        Raises:
            FileNotFoundError: missing directory, config or weights (a folder holding only other
                variants names them).
            ValueError: corrupt/truncated files, an invalid config (file and field named), a
                format version mismatch, weights that do not match the config (the key and the
                config fields setting its shape named), a config deriving buffers larger than its
                weights, or a `device` that is not a device.
            TypeError: a `torch_dtype` that is not a float dtype or one of the names above.
            RuntimeError: `device` is CUDA/MPS and none is available.
        """
        from pathlib import Path

        from mosaicdiff.core.serialization import load_model

        device = kwargs.pop("device_map", None) if device is None else device
        dtype = kwargs.pop("dtype", None)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise TypeError(f"{cls.__name__}.from_pretrained: pass dtype or torch_dtype, not both")
        torch_dtype = dtype if torch_dtype is None else torch_dtype
        subfolder = kwargs.pop("subfolder", None)  # as a pipeline folder's "transformer/"
        unknown = sorted(set(kwargs) - IGNORED_LOAD_KWARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained: unexpected keyword argument(s) {unknown}; it takes "
                            f"device, torch_dtype (or dtype), variant and subfolder (a local folder, no hub "
                            f"download)")
        directory = Path(directory) / subfolder if subfolder else directory
        return load_model(cls, directory, device=device, torch_dtype=torch_dtype, variant=variant)

    def extra_repr(self) -> str:
        stages = ", ".join(f"{n}[{a},{b}) sparsity={s:g}" for n, a, b, s in self._ranges)
        return f"stages=[{stages}], cuda_graphs={self.cuda_graphs_enabled}"


#: Options diffusers pipelines pass to every component's ``from_pretrained``; meaningless for a local mosaic.
IGNORED_LOAD_KWARGS = {"cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
                       "use_safetensors", "low_cpu_mem_usage", "output_loading_info",
                       "max_memory", "offload_folder", "offload_state_dict", "disable_mmap"}

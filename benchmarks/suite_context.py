"""The state of one GPU suite run (`Suite`), in its own module so that the stages (gpu_suite.py,
suite_e2e.py, suite_sdxl.py) can take it without importing the runner."""

from __future__ import annotations

import copy

import torch
from dit_models import DIT_TINY, DIT_XL2, build_dense, timing_mosaic
from suite_common import env_info


class Suite:
    """The models of one run, built once and shared by the stages."""

    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.cfg = DIT_TINY if args.dry_run else DIT_XL2
        self.batches = args.batches
        self.tokens = (self.cfg["sample_size"] // self.cfg["patch_size"]) ** 2
        self.env = env_info(self.device)
        self._models: dict[str, torch.nn.Module] = {}
        self._dense = None
        self._mosaics: dict[tuple[float, bool], torch.nn.Module] = {}  # (target, copies) -> mosaic

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def dense(self):
        if self._dense is None:
            self._dense = build_dense(self.cfg, self.device, self.dtype)
        return self._dense

    def mosaic(self, target: float, copies: bool = False):
        """The timing mosaic at ``target`` (built without CUDA graphs; e2e enables them); `copies`:
        the same stages with a copy of the producers per stage instead of the shared storage."""
        if (target, copies) not in self._mosaics:
            stages = self._mosaics[(target, False)].stages if (target, False) in self._mosaics else None
            self._mosaics[(target, copies)] = timing_mosaic(self.dense(), target, share_producers=not copies,
                                                            stages=stages)
        return self._mosaics[(target, copies)]

    def model(self, name: str):
        """The e2e config ``name``, built on first use."""
        if name not in self._models:
            self._models[name] = self._build(name)
        return self._models[name]

    def _build(self, name: str):
        from mosaicdiff.families.dit.model import MosaicDiT

        if name == "diffusers_eager_dense":
            return self.dense()
        if name == "diffusers_compile_dense":
            return torch.compile(self.dense(), dynamic=False)
        if name in ("engine_dense", "engine_dense_unfused"):
            engine = MosaicDiT.from_dense_unpruned(self.dense()).enable_cuda_graphs(self.cuda)
            return engine.set_block_boundary_fusion(name == "engine_dense")
        if name.startswith("engine_mosaic_"):
            target = float(name.split("_")[2])
            return self.mosaic(target, copies=name.endswith("_copies")).enable_cuda_graphs(self.cuda)
        if name == "compile_pruned_0.5":
            pruned = copy.deepcopy(self.mosaic(0.5))
            pruned.forward_stage = torch.compile(pruned.forward_stage, mode="reduce-overhead", dynamic=False)
            return pruned
        raise ValueError(f"unknown config {name!r}")

    def inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        c, s = self.cfg["in_channels"], self.cfg["sample_size"]
        x = torch.randn(batch, c, s, s, generator=g).to(self.device, self.dtype)
        y = torch.randint(0, self.cfg["num_embeds_ada_norm"], (batch,), generator=g).to(self.device)
        return x, y

    def timestep(self, model, t: int, batch: int) -> torch.Tensor:
        """The timestep exactly as `mosaicdiff.sample` hands it to ``model`` (same compile guards)."""
        host = getattr(model, "accepts_host_timestep", False)
        return torch.full((batch,), int(t), dtype=torch.long, device="cpu" if host else self.device)

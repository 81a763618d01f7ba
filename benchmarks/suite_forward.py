"""One denoiser forward per config, for a model family: the shared body of the sdxl and pixart stages.

A `ForwardBench` says how to build the family's dense model at its real config (random weights:
speed does not depend on their values), its forward inputs and its sampler; this module builds
the four configs from it and times them side by side at the timestep of each mosaic stage:

- ``diffusers_eager_dense``: the diffusers model as it is;
- ``mosaic_0.3``: the family's mosaic at mean sparsity 0.3 on the sampler's schedule (three
  stages from the closed form, widths aligned to 64, shared producers). The kept units are
  magnitude-selected (``pruner="magnitude"``): timing depends only on the widths, which the
  divide + allocate step fixes, not on which units OBS would keep;
- ``diffusers_compile_dense``: ``torch.compile(dynamic=False)`` of the dense model, compiled once
  (inductor; the dry run traces with dynamo and runs the graph eagerly, ``backend="eager"``);
- ``engine_dense``: the family's mosaic at sparsity 0 (one stage: the compact blocks on the
  engine's ops).

Each config's ``ms_per_forward`` is the step-weighted mean over the sampler's steps; the ratios
(slower / faster) are recomputed after every config and ``<name>.json`` rewritten, so a guard
timeout keeps what was measured.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from suite_common import log, record_failure, stage_step_weights, time_ms, unique_graphs, write_json

TARGET_SPARSITY = 0.3
#: In order of importance: the file keeps what was measured when the guard fires.
PLAN = ("diffusers_eager_dense", "mosaic_0.3", "diffusers_compile_dense", "engine_dense")
RATIO_PAIRS = (("diffusers_eager_dense", "diffusers_compile_dense"), ("diffusers_eager_dense", "engine_dense"),
               ("diffusers_compile_dense", "engine_dense"), ("engine_dense", "mosaic_0.3"),
               ("diffusers_eager_dense", "mosaic_0.3"), ("diffusers_compile_dense", "mosaic_0.3"))
ENGINE_CONFIGS = ("engine_dense", "mosaic_0.3")


class ForwardBench:
    """A family's dense model, sampler and inputs, and the configs built from them on first use.

    Subclasses set `name` (the stage and its file), `title`, `targets` (name -> (slower config,
    faster config, target ratio)) and define `build_dense`, `make_scheduler` and `inputs`.
    """

    name = ""
    title = ""
    targets: dict[str, tuple[str, str, float]] = {}
    #: Free each engine config once timed (its memory report kept): for models of which three
    #: copies (dense, engine dense, mosaic) do not fit the card at once (FLUX.1-dev in bf16).
    release_models = False

    def __init__(self, suite):
        self.device, self.dtype, self.dry_run = suite.device, suite.dtype, suite.args.dry_run
        #: inductor on the GPU; in the dry run dynamo still traces the whole model (graph and
        #: recompile counts are real) but skips inductor's CPU codegen, a minute on 2 cores.
        self.compile_backend = "eager" if self.dry_run else "inductor"
        self.scheduler = self.make_scheduler()
        self.dense = self.build_dense()
        self._models: dict[str, torch.nn.Module] = {}

    # -- what a family defines
    def build_dense(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_scheduler(self):
        raise NotImplementedError

    def inputs(self, batch: int | None = None, seed: int = 0) -> dict:
        """The forward's keyword arguments besides the timestep."""
        raise NotImplementedError

    def engine(self, mosaic: torch.nn.Module) -> torch.nn.Module:
        """Per-family runtime switches of an engine config (default: none)."""
        return mosaic

    # -- the configs
    def model(self, name: str):
        if name not in self._models:
            self._models[name] = self._build(name)
        return self._models[name]

    def release(self, name: str) -> None:
        """Drop a built config and return its memory to the device."""
        import gc

        self._models.pop(name, None)
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _build(self, name: str):
        import mosaicdiff
        from mosaicdiff.api import prune_stages
        from mosaicdiff.families import family_for

        if name == "diffusers_eager_dense":
            return self.dense
        if name == "diffusers_compile_dense":
            return torch.compile(self.dense, dynamic=False, backend=self.compile_backend)
        if name == "engine_dense":
            return self.engine(mosaicdiff.prune(self.dense, None, 0.0, method="magnitude", scheduler=self.scheduler,
                                                progress=False))
        if name == "mosaic_0.3":
            stages = prune_stages(self.dense, None, TARGET_SPARSITY, method="mosaic", pruner="magnitude",
                                  scheduler=self.scheduler, num_inference_steps=len(self.scheduler.timesteps),
                                  progress=False)
            mosaic = family_for(self.dense).mosaic_class.from_dense(
                self.dense, stages, share_producers=True,
                meta={"method": "timing-only magnitude", "target_sparsity": TARGET_SPARSITY})
            return self.engine(mosaic)
        raise ValueError(f"unknown {self.name} config {name!r}")

    #: The timestep's shape as the family's pipeline passes it: 0-D (SDXL) or one per row (PixArt).
    timestep_shape: tuple[int, ...] = ()

    def timestep(self, name: str, t: float) -> torch.Tensor:
        """The timestep: on the device for diffusers (the pipeline's form; no recompile per value
        under ``dynamic=False``), on the host for a mosaic (its stage is read there, no sync)."""
        device = "cpu" if name in ENGINE_CONFIGS else self.device
        return torch.full(self.timestep_shape, float(t), device=device)


def measure(bench: ForwardBench, name: str, inputs: dict, rep_ms: int, weights: list[tuple[int, int]]) -> dict:
    """Per-stage and step-weighted ms per forward of one config (``weights``: the mosaic's
    (timestep, steps) per stage: every config runs at the same timesteps)."""
    model = bench.model(name)
    cuda = bench.device == "cuda"
    rec: dict = {"config": name, "per_stage_ms": {}, "first_call_s": {}}
    graphs_before, t_start = unique_graphs(), time.perf_counter()
    total = steps = 0.0
    with torch.no_grad():
        for t, n in weights:
            tt = bench.timestep(name, t)
            run = lambda: model(timestep=tt, return_dict=False, **inputs)  # noqa: E731
            first = time.perf_counter()
            run()  # compile (inductor, Triton kernels) happens here
            if cuda:
                torch.cuda.synchronize()
            rec["first_call_s"][str(t)] = round(time.perf_counter() - first, 2)
            ms = time_ms(run, bench.device, rep_ms)
            rec["per_stage_ms"][str(t)] = ms
            total, steps = total + n * ms, steps + n
    rec["ms_per_forward"] = total / steps
    rec["wall_s"] = round(time.perf_counter() - t_start, 1)
    rec["dynamo_graphs_compiled"] = unique_graphs() - graphs_before
    where = "host" if name in ENGINE_CONFIGS else "device"
    rec["timestep_form"] = f"{where} tensor of shape {list(bench.timestep_shape)}"
    return rec


def ratios(records: list[dict], targets: dict[str, tuple[str, str, float]]) -> dict:
    """Ratios of ms_per_forward within this run (slower / faster: > 1 means the second is faster)."""
    by = {r["config"]: r for r in records}
    out = {"ratios": {}, "targets": {}}
    for num, den in RATIO_PAIRS:
        if num in by and den in by:
            out["ratios"][f"{num}/{den}"] = by[num]["ms_per_forward"] / by[den]["ms_per_forward"]
    for name, (num, den, target) in targets.items():
        if num in by and den in by:
            value = by[num]["ms_per_forward"] / by[den]["ms_per_forward"]
            out["targets"][name] = {"measure": "ms_per_forward", "ratio": value, "target": target,
                                    "met": value >= target}
    return out


def shapes(inputs: dict) -> dict:
    """The inputs' shapes for the results file (nested dicts flattened; None kept)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out.update(shapes(value))
        else:
            out[key] = list(value.shape) if isinstance(value, torch.Tensor) else value
    return out


def run_forward_stage(bench: ForwardBench, rep_ms: int, out: Path, header: dict) -> tuple[dict, bool]:
    """Time every config of `bench` (PLAN order); writes ``<bench.name>.json`` after every config.

    Returns:
        (the results dict, whether every config ran).
    """
    path = out / f"{bench.name}.json"
    inputs = bench.inputs()
    result = {**header, "inputs": shapes(inputs), "steps": len(bench.scheduler.timesteps),
              "scheduler": f"{type(bench.scheduler).__name__} ({len(bench.scheduler.timesteps)} steps)",
              "target_sparsity": TARGET_SPARSITY, "mosaic_pruner": "magnitude (timing only: widths from divide + allocate)",
              "compile_backend": bench.compile_backend, "records": [], "errors": []}
    try:
        mosaic = bench.model("mosaic_0.3")  # its stages fix the timesteps every config is timed at
        weights = stage_step_weights(mosaic, bench.scheduler)
        result["stages"] = [{"name": name, "t_start": t0, "t_end": t1, "sparsity": sp, "timestep": t, "steps": n}
                            for (name, t0, t1, sp), (t, n) in zip(mosaic.stage_ranges, weights)]
        result["memory"] = {"mosaic_0.3": mosaic.memory_report()}
        write_json(path, result)
        for name in PLAN:
            try:
                rec = measure(bench, name, inputs, rep_ms, weights)
            except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others
                record_failure(result, name, exc, bench.name)
                continue
            result["records"].append(rec)
            if name in ENGINE_CONFIGS:
                result.setdefault("memory", {})[name] = bench.model(name).memory_report()
                if bench.release_models:
                    bench.release(name)
            result.update(ratios(result["records"], bench.targets))
            write_json(path, result)
            per_stage = ", ".join(f"t={t} {ms:.2f}" for t, ms in rec["per_stage_ms"].items())
            log(f"  {bench.name} {name:<24} {rec['ms_per_forward']:8.2f} ms/forward ({per_stage}), "
                f"{rec['dynamo_graphs_compiled']} dynamo graphs, {rec['wall_s']} s")
    finally:
        if "engine_dense" in bench._models and "engine_dense" not in result.get("memory", {}):
            result.setdefault("memory", {})["engine_dense"] = bench.model("engine_dense").memory_report()
        if result["records"] or result["errors"]:
            write_json(path, result)
    return result, not result["errors"]


@contextlib.contextmanager
def single_thread_on_cpu(dry_run: bool):
    """Run the tiny dry-run ops on one thread (an OpenMP team spinning on a busy shared core costs
    ~100x); the thread count is restored after."""
    threads = torch.get_num_threads()
    if dry_run:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

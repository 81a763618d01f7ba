"""Helpers shared by the GPU suite's stages (gpu_suite.py, suite_e2e.py, suite_sdxl.py): logging,
the stage guard, a failed config's record, freeing a dropped config, results files, the run's
header, timing, a mosaic's step weights and the count of dynamo graphs."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mosaic_kernels import timing
from mosaicdiff.core.atomic_io import write_json_atomic


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StageTimeout(Exception):
    """A stage ran past its wall-clock guard."""


def is_timeout(exc: BaseException | None) -> bool:
    """True when ``exc`` is, or was raised from, a `StageTimeout` (torch.compile wraps errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StageTimeout):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def wall_clock_guard(seconds: float) -> Iterator[None]:
    """Raise `StageTimeout` in the main thread after ``seconds`` (checked between Python bytecodes,
    so a long CUDA call finishes first; the shell script's `timeout` is the hard stop)."""

    def fire(signum, frame):
        raise StageTimeout(f"past its {seconds:.0f} s guard")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def record_failure(result: dict, name: str, exc: Exception, stage: str) -> None:
    """Note config `name`'s failure in ``result["errors"]`` and go on; a guard timeout (however
    wrapped) ends the stage instead."""
    if is_timeout(exc):
        raise StageTimeout(str(exc)) from exc
    message = f"{type(exc).__name__}: {exc}"
    result["errors"].append({"config": name, "error": message[:500]})
    log(f"  {stage} {name}: {message}")


def free_memory(cuda: bool) -> None:
    """Return a dropped config's memory to the device before the next one is built."""
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a half-written file never replaces a complete one); non-JSON values as str."""
    write_json_atomic(path, obj, default=str)


def git_commit() -> str:
    if os.environ.get("MOSAIC_COMMIT"):
        return os.environ["MOSAIC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info(device: str) -> dict:
    """Card, clocks, versions and backends: the header of every results file."""
    import diffusers

    from mosaic_kernels import backends

    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0],
            "backends": backends(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        try:
            info["nvidia_smi"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                 "--format=csv,noheader"], text=True, timeout=20).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out is not finite."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return math.inf
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def time_ms(fn: Callable[[], object], device: str, rep_ms: int = 200) -> float:
    """Median ms of fn(): `triton.testing.do_bench` on CUDA, a perf_counter loop on the CPU."""
    return timing.time_ms(fn, device, rep_ms)[0]


def stage_step_weights(model, scheduler) -> list[tuple[int, int]]:
    """(representative timestep, number of sampler steps) per stage of a mosaic."""
    if not hasattr(model, "stage_for"):
        return [(500, 1)]
    counts: dict[int, list[int]] = {}
    for t in scheduler.timesteps.tolist():
        counts.setdefault(model.stage_for(t), []).append(int(t))
    return [(ts[0], len(ts)) for _, ts in sorted(counts.items())]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])

"""Reliability of `mosaicdiff sample --num-images N` (issue 25): nothing lost, nothing mixed, nothing
allocated or written before it is checked.

Each bug of the issue has a test here that failed on the code before the fix; each poor answer a
bad-input test (one line, non-zero exit, nothing left behind). Most cases use a toy class-conditional
model (`Toy`: a few multiplications, so a run of a hundred shards takes a second); the command-line
cases use the embedded digits DiT. The open-file and memory cases run in a subprocess with a lowered
resource limit (``resource.setrlimit``), so a failure cannot take the test session down with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaicdiff.app.cli import main
from mosaicdiff.core import distributed, sampling, sharded_sampling as ss

N, SHARD, BATCH = 6, 2, 2
SAMPLE = ["sample", "--num-images", str(N), "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--steps", "1",
          "--no-progress"]
SUBPROCESS_TIMEOUT_S = 60

# A class-conditional, DiT-like toy (see `mosaicdiff.core.sampling`): eps = w * x + b[label]. Shared with
# the subprocess scripts, which define it from this source (no diffusers model import: fast start-up).
TOY_SOURCE = '''
import types
import torch

class Toy(torch.nn.Module):
    def __init__(self, size=4, num_classes=10):
        super().__init__()
        self.config = types.SimpleNamespace(in_channels=3, out_channels=3, sample_size=size,
                                            num_embeds_ada_norm=num_classes)
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.linspace(-0.5, 0.5, num_classes + 1))

    def forward(self, x, timestep, class_labels):
        return types.SimpleNamespace(sample=self.w * x + self.b[class_labels].view(-1, 1, 1, 1))
'''
_toy_module = types.ModuleType("_toy")
exec(TOY_SOURCE, _toy_module.__dict__)  # noqa: S102 - our own source, above
Toy = _toy_module.Toy

OPTIONS = {"num_inference_steps": 2, "guidance_scale": 1.5, "shard_size": SHARD, "batch_size": BATCH,
           "progress": False}


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) -> its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "shards").glob("images-*.npy"))


def _images(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as data:
        return data["arr_0"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mosaicdiff sample: error: "), err
    return err


def _run_script(source: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source), *args], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, env=env, check=False)


# ----------------------------------------------------------------------------- bug 1: NaN/inf images

def test_overflowing_guidance_fails_naming_the_step_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["sample", "--num-images", "10", "--shard-size", "5", "--batch-size", "5", "--steps", "5",
            "--guidance-scale", "1e38", "--no-progress"]
    assert main(argv + ["--out", str(out)]) != 0
    err = _one_line_error(capsys)
    assert "NaN/inf" in err and "step 2 of 5" in err and "images 0-4" in err, err
    assert _tree(tmp_path) == {}, "no samples.npz of black images, no manifest of a run that never began"
    grid = tmp_path / "x.png"
    assert main(["sample", "--steps", "5", "--guidance-scale", "1e38", "--num-samples", "4", "--no-progress",
                 "--out", str(grid)]) != 0
    err = _one_line_error(capsys)
    assert "NaN/inf" in err and "step 2 of 5" in err, err
    assert not grid.exists()


def test_a_model_with_one_nan_weight_fails_naming_the_step(tmp_path):
    model = Toy()
    with torch.no_grad():
        model.b[3] = float("nan")  # the images of class 3 only: image 3, in the second shard
    with pytest.raises(ValueError, match=r"images 2-3: the images became NaN/inf at sampling step 1 of 2"):
        ss.sample_to_npz(model, tmp_path / "d", 6, **OPTIONS)
    kept = [p.name[:24] for p in _shard_files(tmp_path / "d")]
    assert kept == ["images-00000000-00000002"], "the finished first shard is kept, nothing else written"
    assert not (tmp_path / "d" / "samples.npz").exists() and not list((tmp_path / "d").rglob(".*.tmp"))
    with pytest.raises(ValueError, match=r"NaN/inf at sampling step 1 of 3 \(timestep \d+\)"):
        sampling.sample(model, [1, 3], num_inference_steps=3, progress=False)


def test_a_vae_decoding_nan_is_refused(tmp_path):
    class NanVae(torch.nn.Module):
        config = types.SimpleNamespace(latent_channels=3, scaling_factor=1.0, block_out_channels=(8,))

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def decode(self, z):
            return types.SimpleNamespace(sample=z * float("nan"))

    with pytest.raises(ValueError, match=r"images 0-1: the VAE decoded NaN/inf"):
        ss.sample_to_npz(Toy(), tmp_path / "d", 2, vae=NanVae(), **OPTIONS)


# ----------------------------------------------------------------------------- bug 2: finished file kept

def test_a_finished_samples_npz_is_not_replaced_by_a_run_of_other_settings(tmp_path, capsys):
    import shutil

    out = tmp_path / "d"
    assert main(SAMPLE + ["--out", str(out)]) == 0
    shutil.rmtree(out / "shards")  # as an earlier refusal advised
    before = _tree(tmp_path)
    assert main(SAMPLE + ["--out", str(out), "--seed", "1"]) == 2
    err = _one_line_error(capsys)
    assert "samples.npz" in err and "settings are unknown" in err, err
    assert _tree(tmp_path) == before, "the finished samples.npz is untouched"


# ----------------------------------------------------------------------------- bug 3: one run per folder

def test_a_second_run_into_a_busy_folder_fails_and_leaves_the_first_alone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    first_sampling, release = threading.Event(), threading.Event()
    first = {}
    real_sample = sampling.sample

    def sample(*args, **kwargs):
        if threading.current_thread().name == "first" and not first_sampling.is_set():
            first_sampling.set()
            release.wait(SUBPROCESS_TIMEOUT_S)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", sample)
    runner = threading.Thread(target=lambda: first.update(rc=main(SAMPLE + ["--out", str(out)])), name="first")
    runner.start()
    try:
        assert first_sampling.wait(SUBPROCESS_TIMEOUT_S), "the first run did not start sampling"
        in_flight = out / "shards" / ".images-00000000-00000002.npy.a1b2c3.tmp"  # the first run's write
        in_flight.write_bytes(b"half a shard")
        capsys.readouterr()
        assert main(SAMPLE + ["--out", str(out)]) == 1
        err = _one_line_error(capsys)
        assert "another run" in err and "in progress" in err, err
        assert in_flight.exists(), "the second run deleted the first's in-flight shard"
    finally:
        release.set()
        runner.join(SUBPROCESS_TIMEOUT_S)
    assert first == {"rc": 0}
    assert _images(out).shape == (N, 16, 16, 3)


def test_a_folder_locked_by_another_process_is_refused(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                                "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"),
         str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError, match="another run .* is in progress"):
            ss.sample_to_npz(Toy(), out, 4, **OPTIONS)
        assert _tree(out) == {}
    finally:
        holder.stdin.close()
        holder.wait(30)
    ss.sample_to_npz(Toy(), out, 4, **OPTIONS)  # the lock went with its process


# ----------------------------------------------------------------------------- bug 4: open-file limit

FD_LIMIT_SCRIPT = TOY_SOURCE + '''
import os, resource, sys
from mosaicdiff.core import sharded_sampling as ss

limit = len(os.listdir("/proc/self/fd")) + 16  # the files open now, and a few to work with
num = limit + 32
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ss.sample_to_npz(Toy(size=2), sys.argv[1], num, num_inference_steps=1, shard_size=1, batch_size=1, progress=False)
print(num, limit)
'''


def test_more_shards_than_the_open_file_limit_are_assembled(tmp_path):
    """Assembly streams the shards one at a time: 32 shards more than the open-file limit."""
    done = _run_script(FD_LIMIT_SCRIPT, str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr[-3000:]
    num, _limit = map(int, done.stdout.split())
    images = _images(tmp_path / "d")
    assert images.shape == (num, 2, 2, 3) and len(_shard_files(tmp_path / "d")) == num


# ----------------------------------------------------------------------------- bug 5: stale temporaries

def test_a_rerun_removes_the_temporaries_a_killed_assembly_left(tmp_path):
    out = tmp_path / "d"
    ss.sample_to_npz(Toy(), out, N, **OPTIONS)
    leaked = out / ".samples.npz.x7k2m9q1.tmp"  # what a kill during assembly leaves (atomic_io's naming)
    leaked.write_bytes(b"\0" * 1000)
    half_shard = out / "shards" / ".images-00000000-00000002.npy.p0q1r2.tmp"
    half_shard.write_bytes(b"half")
    foreign = [out / ".notes.txt.tmp", out / "shards" / ".other.tmp", out / "keep.txt"]
    for p in foreign:
        p.write_text("not ours")
    ss.sample_to_npz(Toy(), out, N, **OPTIONS)
    assert not leaked.exists() and not half_shard.exists()
    assert all(p.exists() for p in foreign), "only temporaries of our own naming are removed"


# ----------------------------------------------------------------------------- bug 6: N bounded up front

HUGE_N_SCRIPT = TOY_SOURCE + '''
import os, resource, sys
import torch
from mosaicdiff.core import sharded_sampling as ss

torch.set_num_threads(1)
model = Toy()
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    ss.sample_to_npz(model, sys.argv[1], 10**12, num_inference_steps=1, progress=False)
except ValueError as exc:
    print("ValueError:", exc)
ranges = ss.shard_ranges(10**12, 1000)  # lazy: an eager list would be 10**9 tuples (MemoryError here)
print(len(ranges), ranges[0], ranges[-1], list(ss.shard_ranges(7, 3)))
'''


def test_a_huge_num_images_is_refused_against_free_disk_before_any_allocation(tmp_path):
    out = tmp_path / "d"
    done = _run_script(HUGE_N_SCRIPT, str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    refusal, ranges = done.stdout.strip().split("\n")
    assert refusal.startswith("ValueError: sample_to_npz: num_images=1000000000000") and "free" in refusal, refusal
    assert not out.exists()
    assert ranges == "1000000000 (0, 1000) (999999999000, 1000000000000) [(0, 3), (3, 6), (6, 7)]", ranges


def test_num_images_beyond_free_disk_is_refused(tmp_path, monkeypatch):
    import shutil

    # 100 images of 4x4x3: 4800 bytes of pixels in samples.npz and as many in 50 shards, each file with its
    # headers (about 1 kB for the .npz, 128 bytes per shard): 17.0 kB, on a disk with 6000 bytes free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**6, used=10**6 - 6000,
                                                                                 free=6000))
    with pytest.raises(ValueError, match=r"num_images=100 images of 4x4x3 need 17\.0 kB on disk .* has 6\.0 kB free"):
        ss.sample_to_npz(Toy(), tmp_path / "d", 100, **OPTIONS)
    assert _tree(tmp_path) == {}


def test_more_shard_files_than_a_folder_should_hold_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_images=1000001 in shards of 1 makes 1000001 shard files, more than "
                                         r"1000000; raise shard_size"):
        ss.sample_to_npz(Toy(size=1), tmp_path / "d", 10**6 + 1, **{**OPTIONS, "shard_size": 1})
    assert _tree(tmp_path) == {}


# ----------------------------------------------------------------------------- poor answers

def test_a_bit_flipped_shard_is_sampled_again_on_resume(tmp_path, monkeypatch, caplog):
    out = tmp_path / "d"
    ss.sample_to_npz(Toy(), out, N, **OPTIONS)
    want = _images(out)
    shard = _shard_files(out)[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x04  # one bit of one pixel: still a readable .npy of the right shape
    shard.write_bytes(bytes(data))
    (out / "samples.npz").unlink()
    calls = []
    real_sample = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: (calls.append(1), real_sample(*a, **k))[1])
    ss.sample_to_npz(Toy(), out, N, **OPTIONS)
    assert len(calls) == 1, "only the flipped shard is sampled again"
    assert np.array_equal(_images(out), want)
    assert "sha256" in caplog.text


def test_a_shard_flipped_before_assembly_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "d"

    def flip_then_wait():
        shard = _shard_files(out)[0]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01
        shard.write_bytes(bytes(data))

    monkeypatch.setattr(distributed, "barrier", flip_then_wait)  # between sampling and assembly
    with pytest.raises(OSError, match=r"images-00000000-00000002-.* fails its sha256 check"):
        ss.sample_to_npz(Toy(), out, N, **OPTIONS)
    assert not (out / "samples.npz").exists() and not list(out.glob(".*.tmp"))


def test_an_invalid_manifest_is_called_corrupt(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(SAMPLE + ["--out", str(out)]) == 0
    (out / "samples.npz").unlink()
    (out / "shards" / "manifest.json").write_text('{"format": "mosaicdiff-sharded-sam')  # cut short
    before = _tree(tmp_path)
    assert main(SAMPLE + ["--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "manifest.json is corrupt (not valid JSON" in err and "to start over" in err and "None there" not in err, err
    assert _tree(tmp_path) == before
    for p in _shard_files(out):  # no result left to protect: the corrupt manifest is written anew
        p.unlink()
    assert main(SAMPLE + ["--out", str(out)]) == 0
    assert json.loads((out / "shards" / "manifest.json").read_text())["num_images"] == N


@pytest.mark.parametrize("blocker", ["samples.npz", "shards"])
def test_an_output_name_taken_by_the_wrong_kind_is_refused_before_sampling(blocker, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    out.mkdir()
    if blocker == "samples.npz":
        (out / blocker).mkdir()
    else:
        (out / blocker).write_text("a file")
    before = _tree(tmp_path)
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("sampled before the output was checked"))
    assert main(SAMPLE + ["--out", str(out)]) == 2
    err = _one_line_error(capsys)
    want = "is a folder" if blocker == "samples.npz" else "is a file"
    assert f"{out / blocker} {want}" in err and "File exists" not in err, err
    assert _tree(tmp_path) == before and (out / blocker).is_dir() == (blocker == "samples.npz")


def test_a_run_stopped_before_its_first_shard_may_restart_with_new_settings(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample", interrupted)
    assert main(SAMPLE + ["--out", str(out), "--guidance-scale", "40"]) == 130
    monkeypatch.undo()
    assert main(SAMPLE + ["--out", str(out)]) == 0, capsys.readouterr().err  # corrected: another guidance
    # a kill leaves the manifest behind (no cleanup runs): still no shard, so new settings are welcome
    other = tmp_path / "killed"
    assert main(SAMPLE + ["--out", str(other), "--seed", "3"]) == 0
    for p in _shard_files(other):
        p.unlink()
    (other / "samples.npz").unlink()
    assert main(SAMPLE + ["--out", str(other)]) == 0, capsys.readouterr().err
    assert json.loads((other / "shards" / "manifest.json").read_text())["seed"] == 0
    assert np.array_equal(_images(other), _images(out))


@pytest.mark.parametrize("name,value,message", [
    ("num_inference_steps", 0, "num_inference_steps must be a positive integer, got 0"),
    ("num_inference_steps", 2.5, "num_inference_steps must be a positive integer, got 2.5"),
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number"),
    ("guidance_scale", "2", "guidance_scale must be a finite number"),
    ("seed", 1.5, "seed must be an integer, got 1.5"),
    ("labels", [], "labels must be class ids in [0, 10)"),
    ("labels", [10], "labels must be class ids in [0, 10)"),
    ("shard_size", 0, "shard_size must be a positive integer, got 0"),
])
def test_bad_arguments_are_refused_before_touching_disk(name, value, message, tmp_path):
    options = {**OPTIONS, name: value}
    with pytest.raises(ValueError) as refused:
        ss.sample_to_npz(Toy(), tmp_path / "d", N, **options)
    assert message in str(refused.value) and "\n" not in str(refused.value), refused.value
    assert not (tmp_path / "d").exists()


def test_a_unet_is_refused_with_what_to_use_instead(tmp_path):
    from mosaicdiff.api import prune_stages
    from mosaicdiff.families.unet.model import MosaicUNet
    from mosaicdiff.families.unet.testing import tiny_dense

    dense = tiny_dense()
    mosaic = MosaicUNet.from_dense(dense, prune_stages(dense, None, 0.4, pruner="magnitude", boundaries=(198, 783),
                                                       align=None, progress=False))
    for model in (dense, mosaic):
        with pytest.raises(TypeError) as refused:
            ss.sample_to_npz(model, tmp_path / "d", N, **OPTIONS)
        text = str(refused.value)
        assert f"not a {type(model).__name__}" in text and "DiTTransformer2DModel" in text and "MosaicDiT" in text
        assert "sample_with_text" in text and "\n" not in text, text
    assert not (tmp_path / "d").exists()

"""`mosaicdiff sample --num-images N --out DIR`: shards, resume, 1 vs 2 ranks, the .npz layout, errors.

One 2-process gloo launch (`mosaicdiff.core.distributed.spawn_local`: the environment ``torchrun``
sets, bounded in time) runs every distributed case through the CLI; each rank saves its exit
codes and stderr, and the tests compare with runs made here in one process.

World size 1 vs 2 is compared bitwise: both sample image i in the same batch (the shard layout
does not depend on the world size) with the same ops on one thread, so the float32 results are
the same bits.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaicdiff.app.cli import main
from mosaicdiff.core import distributed, sample_shards, sampling, sharded_sampling as ss

# 12 images in shards of 3 (2 batches of 2 and 1 each): rank 0 samples shards 0 and 2, rank 1 shards 1 and 3
N, SHARD, BATCH = 12, 3, 2
SAMPLE = ["sample", "--num-images", str(N), "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--steps", "2"]
LAUNCH_TIMEOUT_S = 150


def _key(start: int, end: int) -> str:
    """A shard's name up to its sha256: ``images-<start>-<end>``."""
    return f"images-{start:08d}-{end:08d}"


def _shard_file(folder: Path, key: str) -> Path:
    (path,) = (folder / "shards").glob(f"{key}-*.npy")
    return path


def _shards(folder: Path) -> dict[str, tuple[int, int]]:
    """Shard key (`_key`) -> (inode, mtime_ns): a rewritten shard (atomic replace) gets a new inode."""
    return {p.name[:24]: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((folder / "shards").glob("images-*.npy"))}


def _record_writes(monkeypatch) -> list[str]:
    """The keys of the shards written from now on (in order)."""
    written = []
    real = sample_shards.write_shard
    monkeypatch.setattr(sample_shards, "write_shard",
                        lambda out, start, end, pixels: (written.append(_key(start, end)), real(out, start, end,
                                                                                                 pixels))[1])
    return written


def _images(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as data:
        assert data.files == ["arr_0"], data.files
        return data["arr_0"]


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------- the launched ranks

def _rank_main(out: str, second_port: str) -> None:
    """One rank: a 2-rank run, two bad launches, then rank 1 dies after writing its first shard."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out)
    rank = int(os.environ["RANK"])
    sys.stderr = open(out / f"stderr-{rank}.txt", "w", buffering=1)  # noqa: SIM115 - until the process ends
    sys.stdout = open(out / f"stdout-{rank}.txt", "w", buffering=1)  # noqa: SIM115
    report = {"two": main(SAMPLE + ["--out", str(out / "two")])}  # the CLI starts the group (env://) itself
    sys.stderr.write("\n<end of the first run>\n")
    os.environ["MASTER_PORT"] = second_port  # a new group: not the port of the CLI's group, just closed
    dist.init_process_group("gloo")  # the later runs share one group (the CLI then leaves it alone)
    report["seeds"] = main(SAMPLE + ["--out", str(out / "seeds"), "--seed", str(rank), "--no-progress"])
    report["too_many_ranks"] = main(["sample", "--num-images", "1", "--out", str(out / "one"), "--no-progress"])
    (out / f"report-{rank}.json").write_text(json.dumps(report))

    if rank == 1:  # the crash: this rank dies once its first shard is on disk; the launcher ends rank 0
        real = sample_shards.write_shard

        def write_then_die(*args):
            real(*args)
            os._exit(1)

        sample_shards.write_shard = write_then_die
    main(SAMPLE + ["--out", str(out / "killed"), "--no-progress"])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    # rank 1's os._exit(1) ends the launch (the launcher then ends rank 0, as torchrun does)
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)) as failure:
        distributed.spawn_local(_rank_main, 2, args=(str(out), free_port()), timeout_s=LAUNCH_TIMEOUT_S)
    for rank in range(2):
        assert (out / f"report-{rank}.json").is_file(), \
            f"rank {rank} did not get to the crash:\n{failure.value}\n" + (out / f"stderr-{rank}.txt").read_text()
    return out


def _report(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"report-{rank}.json").read_text())


def _stderr(folder: Path, rank: int) -> str:
    return (folder / f"stderr-{rank}.txt").read_text()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same command in one process, without a process group (module scope: one thread here too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one") / "samples"
    try:
        assert main(SAMPLE + ["--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


# ----------------------------------------------------------------------------- what image i is

def test_image_noise_and_labels_are_functions_of_seed_and_index():
    model = _tiny_dit()
    whole = ss.image_noise(model, 5, 0, 6)
    assert torch.equal(ss.image_noise(model, 5, 3, 6), whole[3:]), "image i's noise must not depend on its batch"
    assert not torch.equal(ss.image_noise(model, 6, 0, 6), whole)
    assert len({float(x.sum()) for x in whole}) == 6, "every image gets its own noise"
    assert ss.image_seed(0, 1009) != ss.image_seed(1, 0)
    assert ss.image_labels(8, 13, 10).tolist() == [8, 9, 0, 1, 2]
    assert ss.image_labels(3, 7, 10, labels=[4, 2]).tolist() == [2, 4, 2, 4]


def test_uint8_conversion_follows_dit_and_makes_gray_rgb():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7)
    pixels = ss.to_uint8_nhwc(x)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, 7, 3)
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]  # floor(127.5 x + 128), clamped
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    rgb = ss.to_uint8_nhwc(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)


# ----------------------------------------------------------------------------- one process

def test_npz_has_the_adm_layout(one_process):
    images = _images(one_process)
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert (images[..., 0] == images[..., 2]).all(), "gray images: three equal channels"
    assert images.std() > 10, "sampled digits, not a constant"
    assert sorted(_shards(one_process)) == [_key(s, min(s + SHARD, N)) for s in range(0, N, SHARD)]
    model = _digits()
    direct = sampling.sample(model, torch.arange(N) % 10, noise=ss.image_noise(model, 0, 0, N),
                             num_inference_steps=2, batch_size=BATCH, progress=False)
    # one batch of 2 per call vs the shards' batches: a float32 ulp may move a pixel by one level
    diff = np.abs(images[..., 0].astype(int) - np.clip(127.5 * direct[:, 0].numpy() + 128, 0, 255).astype(int))
    assert diff.max() <= 1, diff.max()


def test_rerun_samples_only_missing_or_corrupt_shards(one_process, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "resumed"
    shutil.copytree(one_process, folder)
    names = sorted(_shards(folder))
    _shard_file(folder, names[0]).unlink()
    _shard_file(folder, names[2]).write_bytes(b"not an npy file")
    (folder / "shards" / f".{_shard_file(folder, names[1]).name}.abc.tmp").write_bytes(b"half a shard")  # cut short
    (folder / "samples.npz").unlink()
    before = _shards(folder)
    written = _record_writes(monkeypatch)
    assert main(SAMPLE + ["--out", str(folder), "--no-progress"]) == 0
    assert written == [names[0], names[2]], written
    after = _shards(folder)
    assert {k: after[k] for k in (names[1], names[3])} == {k: before[k] for k in (names[1], names[3])}
    assert not list((folder / "shards").glob(".*.tmp")), "stale temporary files are removed"
    assert np.array_equal(_images(folder), _images(one_process))


def test_folder_with_shards_of_other_settings_is_refused(one_process, tmp_path, capsys):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(one_process, folder)
    before = _shards(folder)
    assert main(SAMPLE + ["--out", str(folder), "--seed", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds shards sampled with other settings (seed: 0 there, 1 now)" in err and err.count("\n") == 1, err
    assert main(SAMPLE[:-2] + ["--steps", "3", "--out", str(folder), "--no-progress"]) == 2
    assert "num_inference_steps: 2 there, 3 now" in capsys.readouterr().err
    (folder / "shards" / "manifest.json").unlink()
    assert main(SAMPLE + ["--out", str(folder), "--no-progress"]) == 2
    assert "holds shards but no manifest.json" in capsys.readouterr().err
    assert _shards(folder) == before, "nothing was overwritten"


@pytest.mark.parametrize("argv,message", [
    (["sample", "--out", "{tmp}"], "is a folder: add --num-images N"),
    (["sample", "--num-images", "4"], "--num-images N needs --out DIR"),
    (["sample", "--num-images", "4", "--out", "{tmp}/s.png"], "names a file"),
    (["sample", "--num-images", "4", "--out", "{tmp}/d", "--nrow", "2"], "--nrow cannot be used with --num-images"),
    (["sample", "--out", "{tmp}/s.png", "--vae", "v"], "--vae cannot be used with a grid"),
], ids=["folder-without-n", "n-without-out", "n-with-png", "grid-flag", "folder-flag"])
def test_mode_errors(argv, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- 2 ranks

def test_two_ranks_give_the_images_of_one_process(two_ranks, one_process):
    assert [_report(two_ranks, r)["two"] for r in range(2)] == [0, 0]
    assert np.array_equal(_images(two_ranks / "two"), _images(one_process)), "world size 2 vs 1"
    assert "wrote 12 images" in (two_ranks / "stdout-0.txt").read_text()
    assert "wrote" not in (two_ranks / "stdout-1.txt").read_text(), "rank 1 prints nothing"
    first_runs = [_stderr(two_ranks, r).split("<end of the first run>")[0] for r in range(2)]
    assert "sampling (rank 0 of 2)" in first_runs[0], first_runs[0]
    assert "sampling" not in first_runs[1], f"rank 1 showed a progress bar:\n{first_runs[1]}"


def test_bad_launches_fail_on_every_rank_with_one_clear_error(two_ranks):
    for rank in range(2):
        report, err = _report(two_ranks, rank), _stderr(two_ranks, rank)
        assert report["seeds"] == 2 and "launched with different command-line settings (seed: rank 0 0, rank 1 1)" \
            in err, err
        assert report["too_many_ranks"] == 2 and "2 ranks for --num-images 1" in err, err
    assert not (two_ranks / "seeds" / "shards").exists() and not (two_ranks / "one" / "shards").exists()


def test_a_rank_killed_mid_run_is_resumed_without_redoing_finished_shards(two_ranks, one_process, monkeypatch):
    folder = two_ranks / "killed"
    finished = _shards(folder)
    names = [_key(s, min(s + SHARD, N)) for s in range(0, N, SHARD)]
    assert names[1] in finished, "rank 1 wrote its first shard before dying"
    assert names[3] not in finished and not (folder / "samples.npz").exists()
    written = _record_writes(monkeypatch)
    assert main(SAMPLE + ["--out", str(folder), "--no-progress"]) == 0  # resumed in one process
    assert sorted(written) == sorted(set(names) - set(finished)), (written, sorted(finished))
    assert {k: v for k, v in _shards(folder).items() if k in finished} == finished, "finished shards untouched"
    assert np.array_equal(_images(folder), _images(one_process))


# ----------------------------------------------------------------------------- latents and a VAE

def _digits():
    from mosaicdiff import zoo

    return zoo.load_digits_dit()


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


def test_latent_dit_is_decoded_by_the_vae(tmp_path):
    model, vae = _tiny_dit(), _tiny_vae()
    path = ss.sample_to_npz(model, tmp_path / "lib", 5, seed=2, num_inference_steps=2, vae=vae, shard_size=2,
                            batch_size=5, progress=False)
    images = np.load(path)["arr_0"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8  # 8 x 8 latents, VAE factor 2
    latents = sampling.sample(model, torch.arange(5) % 10, noise=ss.image_noise(model, 2, 0, 5), num_inference_steps=2,
                              batch_size=2, progress=False, clamp=False)
    assert latents.abs().max() > 1, "latents are not clamped to the pixel range"
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    want = np.clip(127.5 * decoded.permute(0, 2, 3, 1).numpy() + 128, 0, 255).astype(np.uint8)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1

    with pytest.raises(ValueError, match="4-channel latents, not images: give the VAE"):
        ss.sample_to_npz(model, tmp_path / "novae", 2, num_inference_steps=1, progress=False)


def test_resuming_with_another_model_or_vae_is_refused(tmp_path):
    """The manifest identifies the weights: shards of one model (or VAE) are never mixed with another's."""
    model, vae = _tiny_dit(), _tiny_vae()
    folder = tmp_path / "lib"
    options = {"seed": 2, "num_inference_steps": 1, "shard_size": 2, "batch_size": 2, "progress": False}
    ss.sample_to_npz(model, folder, 4, vae=vae, **options)
    _shard_file(folder, _key(2, 4)).unlink()  # a run cut short: one shard to resume
    before = _shards(folder)
    other_model = _tiny_dit()
    with torch.no_grad():
        other_model.proj_out_2.bias.add_(0.5)  # same architecture and config, other weights
    other_vae = _tiny_vae()
    with torch.no_grad():
        other_vae.decoder.conv_out.bias.add_(0.5)
    with pytest.raises(ValueError, match="holds shards sampled with other settings \\(model_sha256: '"):
        ss.sample_to_npz(other_model, folder, 4, vae=vae, **options)
    with pytest.raises(ValueError, match="holds shards sampled with other settings \\(vae_sha256: '"):
        ss.sample_to_npz(model, folder, 4, vae=other_vae, **options)
    assert _shards(folder) == before, "nothing was written"
    # the same model and VAE resume it (rebuilt: the digest is of the weights, not the object)
    ss.sample_to_npz(_tiny_dit(), folder, 4, vae=_tiny_vae(), **options)
    after = _shards(folder)
    assert sorted(after) == [_key(0, 2), _key(2, 4)]
    assert after[_key(0, 2)] == before[_key(0, 2)], "the finished shard kept"


def test_cli_samples_a_dit_pipeline_folder_with_its_vae(tmp_path, capsys):
    pipeline = tmp_path / "pipeline"
    _tiny_dit().save_pretrained(pipeline / "transformer")
    _tiny_vae().save_pretrained(pipeline / "vae")
    args = ["sample", "--num-images", "3", "--steps", "1", "--no-progress"]
    assert main(args + ["--model", str(pipeline), "--out", str(tmp_path / "auto")]) == 0, capsys.readouterr().err
    assert main(args + ["--model", str(pipeline / "transformer"), "--vae", str(pipeline / "vae"),
                        "--out", str(tmp_path / "explicit")]) == 0
    assert np.array_equal(_images(tmp_path / "auto"), _images(tmp_path / "explicit"))
    assert _images(tmp_path / "auto").shape == (3, 16, 16, 3)
    capsys.readouterr()
    assert main(args + ["--model", str(pipeline / "transformer"), "--out", str(tmp_path / "none")]) == 2
    assert "--vae PATH" in capsys.readouterr().err

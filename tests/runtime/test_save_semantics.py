"""save_pretrained as a well-behaved library saves: next to other files, umask modes, crash safety,
no hidden leftovers, one save per folder at a time, and the output folder validated up front.

Every test checks what is on disk before and after (`_tree`: every path, hidden ones included).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mosaicdiff.core import model_folder, serialization
from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.core.model_folder import STAGING_PREFIX
from mosaicdiff.core.stages import StageSpec
from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_specs

REPO = Path(__file__).resolve().parents[2]


def validate_save_directory(path):
    return model_folder.validate_save_directory(path, MosaicDiT.format_name)


def _mosaic(seed=0):
    with torch.random.fork_rng(devices=[]):  # diffusers' init draws from the global RNG
        torch.manual_seed(seed)
        dense = tiny_dit(seed=seed)
    return MosaicDiT.from_dense(dense, two_stage_specs(dense), meta={"method": "manual-slice", "seed": seed})


@pytest.fixture(scope="module")
def old_new():
    """Two different mosaics of the same architecture (same shapes: the hard case for pairing)."""
    return _mosaic(0), _mosaic(1)


def _out(mosaic):
    x, labels = inputs(batch=2)
    with torch.no_grad():
        return torch.cat([mosaic(x, timestep=t, class_labels=labels).sample for t in (10, 700)])


def _which(folder, old_new):
    """"old" or "new": which of the two mosaics `folder` loads as (fails if neither)."""
    got = _out(MosaicDiT.from_pretrained(folder))
    for name, m in zip(("old", "new"), old_new):
        if torch.equal(got, _out(m)):
            return name
    raise AssertionError(f"{folder} loads as neither the old nor the new model")


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden included) -> a digest of its content ("dir" for folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (f"link:{os.readlink(p)}" if os.path.islink(p)
                                             else hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16])
    return out


def _hidden(root: Path) -> list[str]:
    return sorted(k for k in _tree(root) if any(part.startswith(".") for part in Path(k).parts))


# ------------------------------------------------------------------ 1. next to other files


def test_resave_keeps_the_users_files(tmp_path, old_new):
    old, new = old_new
    target = tmp_path / "m"
    old.save_pretrained(target)
    (target / "README.md").write_text("my notes")
    (target / "samples").mkdir()
    (target / "samples" / "grid.png").write_bytes(b"\x89PNG fake")
    (target / "model.ema.safetensors").write_bytes(b"named like a variant no config listed")
    before = _tree(target)
    new.save_pretrained(target)
    after = _tree(target)
    assert sorted(after) == sorted(before)  # nothing added, nothing deleted
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == ["config.json", "model.safetensors"]  # only the model's own files replaced
    assert (target / "README.md").read_text() == "my notes"
    assert _which(target, old_new) == "new" and _hidden(tmp_path) == []


# ------------------------------------------------------------------ 2. permissions


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask(tmp_path, umask, old_new):
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    previous = os.umask(umask)
    try:
        target = tmp_path / "new" / "m"  # the parent is created too
        old_new[0].save_pretrained(target)
        old_new[1].save_pretrained(target)  # the re-save replaces the files: modes again from the umask
    finally:
        os.umask(previous)
    for folder in (tmp_path / "new", target):
        assert oct(folder.stat().st_mode & 0o777) == oct(dir_mode), folder
    for name in ("config.json", "model.safetensors"):
        assert oct((target / name).stat().st_mode & 0o777) == oct(file_mode), name


# ------------------------------------------------------------------ 3. crashes and leftovers


#: Weights layouts of the old and the new save: one file, or shards of ~3 / ~2 files (204 kB of weights).
LAYOUTS = {"file": {}, "3-shards": {"max_shard_size": "80KB"}, "2-shards": {"max_shard_size": "120KB"}}


def _weights_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model") and p.is_file())


@pytest.mark.parametrize("layouts", [("file", "file"), ("file", "3-shards"), ("3-shards", "2-shards"),
                                     ("2-shards", "file")], ids="-to-".join)
def test_a_crash_at_any_step_leaves_the_old_or_the_new_model(tmp_path, monkeypatch, old_new, layouts):
    """Snapshot the folder at every step boundary of a save (= the disk after a crash there), for a
    save changing the weights' layout (one file, sharded, another shard count): every snapshot loads
    as the old or the new model, and the next save leaves exactly the new layout's files."""
    old, new = old_new
    old_kwargs, new_kwargs = LAYOUTS[layouts[0]], LAYOUTS[layouts[1]]
    target = tmp_path / "m"
    new.save_pretrained(tmp_path / "clean", **new_kwargs)
    clean_files = _weights_files(tmp_path / "clean")
    shutil.rmtree(tmp_path / "clean")
    old.save_pretrained(target, **old_kwargs)
    (target / "README.md").write_text("keep")
    snaps: list[Path] = []

    def snap(label):
        dst = tmp_path / "snaps" / f"{len(snaps):02d}-{label}"
        if target.exists():  # else: the crash leaves no model at all (dst stays missing)
            shutil.copytree(target, dst, symlinks=True)
        snaps.append(dst)

    real_save, real_fsync, real_replace = model_folder.save_file, model_folder.fsync_path, os.replace

    def save_file(tensors, path, metadata=None):
        snap("staging-made")
        Path(path).write_bytes(b"\x00" * 100)  # a crash mid-write leaves a partial file
        snap("partial-weights")
        Path(path).unlink()
        real_save(tensors, path, metadata=metadata)
        snap("weights-written")

    def fsync(path):
        real_fsync(path)
        snap(f"fsync-{Path(path).name[:12]}")

    def replace(src, dst):
        real_replace(src, dst)
        snap(f"replaced-{Path(dst).name}")

    monkeypatch.setattr(model_folder, "save_file", save_file)
    monkeypatch.setattr(model_folder, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    new.save_pretrained(target, **new_kwargs)
    monkeypatch.undo()
    assert _weights_files(target) == clean_files

    labels = [s.name for s in snaps]
    missing = [s.name for s in snaps if not s.exists()]
    assert not missing, f"a crash at these steps leaves no model: {missing}"
    states = [_which(s, old_new) for s in snaps]
    first_new = states.index("new")
    assert states == ["old"] * first_new + ["new"] * (len(states) - first_new), list(zip(labels, states))
    assert len(snaps) >= 8, labels
    # The commit is the config rename: from there on the loader pairs config and weights by id,
    # reading the staged weights while the old ones are still in place.
    assert "replaced-config.json" in labels[first_new], list(zip(labels, states))
    assert any(p.startswith(STAGING_PREFIX) for p in os.listdir(snaps[first_new]))

    for s in snaps:
        assert (s / "README.md").read_text() == "keep"
        # Cleanup on start: the next save finishes or discards the crashed one; no hidden leftovers,
        # no weights files of another layout.
        new.save_pretrained(s, **new_kwargs)
        assert _hidden(s) == [] and _which(s, old_new) == "new", s.name
        assert _weights_files(s) == clean_files, s.name


def test_a_failing_save_after_a_crash_mid_commit_keeps_the_committed_model(tmp_path, monkeypatch, old_new):
    """Crash between the config and the weights renames, then a save that fails on a full disk:
    the cleanup on start must first finish the committed save, not drop its staged weights."""
    old, new = old_new
    target = tmp_path / "m"
    old.save_pretrained(target)
    real_replace, dead = os.replace, []

    def crash_after_commit(src, dst):
        if dead:  # the process "died" at the commit: no later rename happens
            raise OSError(errno.EIO, "dead")
        real_replace(src, dst)
        if Path(dst) == target / "config.json":  # the commit (the config's own rename stays in staging)
            dead.append(True)
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash_after_commit)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target)
    monkeypatch.undo()
    assert any(p.startswith(STAGING_PREFIX) for p in os.listdir(target)) and _which(target, old_new) == "new"

    def disk_full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(model_folder, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        old.save_pretrained(target)
    assert _which(target, old_new) == "new" and _hidden(target) == []


def test_an_interrupted_sharded_variant_save(tmp_path, monkeypatch, old_new):
    """A sharded variant save killed between the commit and the moves: the variant loads as the new
    model (from the staging folder), the default weights of the old model are no longer listed,
    and the next save finishes the commit, keeps the variant and removes the stale files."""
    old, new = old_new
    target = tmp_path / "m"
    old.save_pretrained(target)
    old.save_pretrained(target, variant="fp16")  # the same model: both sets kept
    assert _weights_files(target) == ["model.fp16.safetensors", "model.safetensors"]
    real_replace, dead = os.replace, []

    def crash_after_commit(src, dst):
        if dead:
            raise OSError(errno.EIO, "dead")
        real_replace(src, dst)
        if Path(dst) == target / "config.json":
            dead.append(True)
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash_after_commit)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(target, variant="fp16", max_shard_size="120KB")
    monkeypatch.undo()
    got = _out(MosaicDiT.from_pretrained(target, variant="fp16"))
    assert torch.equal(got, _out(new))
    with pytest.raises(FileNotFoundError, match="holds variant 'fp16'"):
        MosaicDiT.from_pretrained(target)  # the config is the new model's: the old default is not its
    new.save_pretrained(target)
    assert _hidden(target) == [] and _which(target, old_new) == "new"
    assert _weights_files(target) == ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors",
                                      "model.safetensors", "model.safetensors.index.fp16.json"]
    assert torch.equal(_out(MosaicDiT.from_pretrained(target, variant="fp16")), _out(new))


def test_a_killed_save_is_cleaned_up_by_the_next_one(tmp_path, old_new):
    """A real SIGKILL right after the save's commit (the rename of config.json into the folder):
    between the config and the weights renames, the worst moment."""
    target = tmp_path / "m"
    old_new[0].save_pretrained(target)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.runtime.test_save_semantics import _mosaic
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst) == {str(target / "config.json")!r}:  # the commit (earlier renames stay in staging)
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        _mosaic(1).save_pretrained({str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _hidden(target) != [] and _which(target, old_new) == "new"  # loadable, the staging is left
    old_new[0].save_pretrained(target)
    assert _hidden(tmp_path) == [] and _which(target, old_new) == "old"


def test_leftovers_of_earlier_versions_are_removed(tmp_path, old_new):
    """Killed saves of mosaicdiff <= 0.x left ".NAME.tmp-XXXXXXXX" / ".NAME.old-XXXXXXXX" folders."""
    target = tmp_path / "m"
    old_new[0].save_pretrained(target)
    shutil.copytree(target, tmp_path / ".m.old-abc_1234")
    (tmp_path / ".m.tmp-zz9ab8cd").mkdir()
    (tmp_path / ".m.tmp-zz9ab8cd" / ".tmpAbC123").write_bytes(b"partial")  # safetensors' own temp
    (tmp_path / ".m.tmp-q1w2e3r4").mkdir()
    (tmp_path / ".m.tmp-q1w2e3r4" / "notes.txt").write_text("not ours")  # unknown content: kept
    (tmp_path / ".other.tmp-abcdefgh").mkdir()  # another folder's: kept
    old_new[1].save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp-q1w2e3r4", ".other.tmp-abcdefgh", "m"]


def test_save_through_a_symlink_writes_into_its_target(tmp_path, old_new):
    real, link = tmp_path / "real", tmp_path / "link"
    old_new[0].save_pretrained(real)
    (real / "README.md").write_text("keep")
    link.symlink_to(real, target_is_directory=True)
    old_new[1].save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert sorted(_tree(real)) == ["README.md", "config.json", "model.safetensors"]
    assert _which(real, old_new) == "new"


# ------------------------------------------------------------------ 4. concurrent saves


def test_concurrent_saves_one_wins_the_other_gets_a_clear_error(tmp_path, monkeypatch, old_new):
    old, new = old_new
    target = tmp_path / "m"
    in_save, release = threading.Event(), threading.Event()
    real_save = model_folder.save_file

    def slow_save(tensors, path, metadata=None):
        in_save.set()
        assert release.wait(60)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(model_folder, "save_file", slow_save)
    errors = []
    winner = threading.Thread(target=lambda: new.save_pretrained(target))
    winner.start()
    assert in_save.wait(60)
    try:
        with pytest.raises(BlockingIOError, match=r"another save into .*m is in progress; wait for it"):
            old.save_pretrained(target)
    except BaseException as exc:  # pragma: no cover - keep the winner from hanging
        errors.append(exc)
    release.set()
    winner.join(60)
    assert not errors, errors
    assert _which(target, old_new) == "new" and _hidden(tmp_path) == []


def test_a_save_into_a_folder_locked_by_another_process_fails_clearly(tmp_path, old_new):
    target = tmp_path / "m"
    old_new[0].save_pretrained(target)
    before = _tree(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BlockingIOError, match="another save into"):
            old_new[1].save_pretrained(target)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert _tree(tmp_path) == before
    old_new[1].save_pretrained(target)  # the lock is gone with its process
    assert _which(target, old_new) == "new"


# ------------------------------------------------------------------ 5. validation before work


def _foreign(folder: Path, name: str, content: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(content)
    return folder


@pytest.mark.parametrize("kind, make, exc, match", [
    ("file", lambda p: (p.write_text("x"), p)[1], FileExistsError, r"exists and is a file, not a folder"),
    ("diffusers-model", lambda p: _foreign(p, "config.json", json.dumps({"_class_name": "UNet2DModel"})),
     FileExistsError, r"holds the config\.json of another model \(UNet2DModel\); saving a MosaicDiT there "
                      r"would overwrite or mix with it; choose an empty or new folder"),
    ("config-other", lambda p: _foreign(p, "config.json", json.dumps({"hidden_size": 3})),
     FileExistsError, r"holds a config\.json of another kind"),
    ("config-not-json", lambda p: _foreign(p, "config.json", "{oops"),
     FileExistsError, r"holds a config\.json that is not valid JSON"),
    ("pipeline", lambda p: _foreign(p, "model_index.json", "{}"),
     FileExistsError, r"holds a diffusers pipeline \(model_index\.json\)"),
    ("weights-only", lambda p: _foreign(p, "model.safetensors", "x"),
     FileExistsError, r"holds a model\.safetensors without a MosaicDiT config\.json"),
    ("parent-is-file", lambda p: _parent_file(p),
     NotADirectoryError, r"cannot create .* is a file, not a folder"),
    ("dangling-link", lambda p: (p.symlink_to(p.parent / "gone"), p)[1],
     FileExistsError, r"is a symlink to a missing folder"),
])
def test_bad_output_locations_are_refused_before_anything_is_written(tmp_path, old_new, kind, make, exc, match):
    target = make(tmp_path / "out")
    before = _tree(tmp_path)
    with pytest.raises(exc, match=match):
        validate_save_directory(target)
    with pytest.raises(exc, match=match):
        old_new[0].save_pretrained(target)
    assert _tree(tmp_path) == before


def _parent_file(p: Path) -> Path:
    p.write_text("a file")
    return p / "m"


def test_valid_output_locations(tmp_path, old_new):
    missing = tmp_path / "a" / "b" / "m"
    assert validate_save_directory(str(missing)) == missing and not (tmp_path / "a").exists()  # creates nothing
    (tmp_path / "empty").mkdir()
    other = _foreign(tmp_path / "other", "notes.txt", "x")
    old_new[0].save_pretrained(tmp_path / "saved")
    before = _tree(tmp_path)
    for ok in (tmp_path / "empty", other, tmp_path / "saved"):
        assert validate_save_directory(ok) == ok
    assert _tree(tmp_path) == before  # the write probe is removed


@pytest.fixture
def unwritable(monkeypatch):
    """Make the write probe fail as in a read-only folder (root bypasses mode bits)."""
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if os.path.basename(path).startswith(model_folder.PROBE_PREFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)


@pytest.mark.parametrize("exists", [True, False], ids=["folder", "missing-folder"])
def test_unwritable_location(tmp_path, old_new, unwritable, exists):
    target = tmp_path / "m"
    if exists:
        target.mkdir()
    where = target if exists else tmp_path
    before = _tree(tmp_path)
    with pytest.raises(PermissionError, match=rf"cannot write into {where} \(Permission denied\); choose a folder"):
        validate_save_directory(target)
    with pytest.raises(PermissionError, match="cannot write into"):
        old_new[0].save_pretrained(target)
    assert _tree(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into 0o555 folders")
def test_read_only_folder_real(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write into"):
            validate_save_directory(target)
    finally:
        target.chmod(0o755)


@pytest.mark.parametrize("fails", ["weights", "config"])
def test_disk_full_keeps_the_old_model(tmp_path, monkeypatch, old_new, fails):
    old, new = old_new
    target = tmp_path / "m"
    old.save_pretrained(target)
    (target / "README.md").write_text("keep")
    before = _tree(tmp_path)

    def full(*args, **kwargs):
        path = Path(args[1] if fails == "weights" else args[0])
        path.write_bytes(b"\x00" * 64)  # a partial file, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_folder, "save_file" if fails == "weights" else "write_json_atomic", full)
    name = "model.safetensors" if fails == "weights" else "config.json"
    with pytest.raises(OSError, match=rf"writing {name} into .*m failed \(No space left on device\); "
                                      r"the folder was left as it was") as info:
        new.save_pretrained(target)
    assert info.value.errno == errno.ENOSPC
    assert _tree(tmp_path) == before and _which(target, old_new) == "old"
    # A first save into a new folder that fails leaves no folder behind.
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path / "fresh" / "m")
    assert _tree(tmp_path) == before


def test_stages_that_leave_timesteps_uncovered_are_not_saved(tmp_path):
    dense = tiny_dit()
    late, early = two_stage_specs(dense)
    starts_late = MosaicDiT.from_dense(dense, [StageSpec("late", 100, 400, 0.5, late.blocks), early])
    with pytest.raises(ValueError, match=r"cannot save this MosaicDiT: stage 'late' starts at t=100, so t in "
                                         r"\[0, 100\) has no stage"):
        starts_late.save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_weights_without_a_save_id_still_load(tmp_path, old_new):
    """Weights rewritten by hand (no header id) are accepted; shapes are still checked."""
    from safetensors.torch import load_file

    target = tmp_path / "m"
    old_new[0].save_pretrained(target)
    save_file(load_file(target / "model.safetensors"), target / "model.safetensors")
    assert _which(target, old_new) == "old"


def test_a_load_racing_a_save_rereads_the_config(tmp_path, monkeypatch, old_new):
    """A reader that read config.json just before another process's save committed sees new weights:
    it re-reads the config instead of failing (or pairing the old config with the new weights)."""
    target = tmp_path / "m"
    old_new[0].save_pretrained(target)
    stale = serialization.read_config(MosaicDiT, target)
    old_new[1].save_pretrained(target)
    real_read, calls = serialization.read_config, []

    def read_config(cls, path):
        calls.append(path)
        return stale if len(calls) == 1 else real_read(cls, path)

    monkeypatch.setattr(serialization, "read_config", read_config)
    assert _which(target, old_new) == "new" and len(calls) == 2

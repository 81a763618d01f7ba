"""Bad input to the `mosaicdiff` command line (issue 11).

Every case: exit status != 0, exactly one ``mosaicdiff <cmd>: error: ...`` line naming the problem
(checked by an exact fragment), no traceback, and the working folder (inputs, outputs, the default
output names in the current directory) listed the same before and after. Most cases run
``cli.main(argv)`` in-process; a few run ``python -m mosaicdiff`` end to end.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mosaicdiff.app.cli import main

# The exit statuses the CLI documents (literal here, so that the contract itself is under test).
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "runtime"))


# ----------------------------------------------------------------------------- fixtures

def _save_unet(folder: Path) -> None:
    """A tiny real diffusers UNet2DModel folder: the "model of another class" of bug 2."""
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(folder)


def _save_calibration(path: Path, x0=None, labels=None, n: int = 16) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"x0": torch.randn(n, 4, 8, 8, generator=g) if x0 is None else x0,
               "labels": torch.arange(n) % 10 if labels is None else labels}
    save_file({k: v for k, v in tensors.items() if v is not False}, str(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Input files shared by the cases (read-only for them; each case works in its own copy-free cwd)."""
    from dit_helpers import tiny_dit

    d = tmp_path_factory.mktemp("cli_inputs")
    (d / "afile").write_text("not a folder\n")
    _save_unet(d / "unet")
    tiny_dit().save_pretrained(d / "tinydit")
    (d / "noconfig").mkdir()
    (d / "noconfig" / "weights.bin").write_bytes(b"\0" * 8)
    (d / "corrupt").mkdir()
    (d / "corrupt" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", ')
    (d / "listconfig").mkdir()
    (d / "listconfig" / "config.json").write_text("[1, 2]")
    (d / "mosaic").mkdir()
    (d / "mosaic" / "config.json").write_text(json.dumps({"format": "mosaicdiff.MosaicDiT"}))
    (d / "folder").mkdir()
    (d / "calib_text.safetensors").write_text("this is not a safetensors file\n")
    _save_calibration(d / "calib_no_labels.safetensors", labels=False)
    _save_calibration(d / "calib_float_labels.safetensors", labels=torch.full((16,), 1.7))
    _save_calibration(d / "calib.safetensors")  # 4 x 8 x 8: fits tinydit, not the digits model
    _save_calibration(d / "calib_label11.safetensors", x0=torch.randn(4, 1, 16, 16), labels=torch.tensor([0, 1, 11, 2]))
    nan_x0 = torch.randn(4, 1, 16, 16)
    nan_x0[1, 0, 0, 0] = float("nan")
    _save_calibration(d / "calib_nan.safetensors", x0=nan_x0, labels=torch.arange(4))
    (d / "pipe" / "transformer").mkdir(parents=True)
    (d / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (d / "pipe" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    return d


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under `root` with its size (-1 for folders)."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty current directory (default outputs such as samples.png would land here)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the --device cuda cases, on any machine
    return cwd


def error_line(err: str, command: str) -> str:
    """The one error line of `command` in stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mosaicdiff {command}: error: ")
             or line.startswith("mosaicdiff: error: ")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    return lines[0]


def run_case(argv: list[str], inputs: Path, work: Path, capsys) -> tuple[int, str]:
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(work)) for a in argv]
    before_in, before_out = listing(inputs), listing(work)
    code = main(argv)
    err = capsys.readouterr().err
    assert listing(inputs) == before_in, "an input folder changed"
    assert listing(work) == before_out, f"something was written: {listing(work)}"
    return code, error_line(err, argv[0] if argv and not argv[0].startswith("-") else "")


# ----------------------------------------------------------------------------- bad input, in-process

CASES = [
    # bug 5 (CLI part): non-finite floats
    (["sample", "--guidance-scale", "nan", "--out", "{out}/s.png"], "argument --guidance-scale: expected a finite number, got 'nan'"),
    (["sample", "--guidance-scale", "inf"], "expected a finite number, got 'inf'"),
    (["prune", "--out", "{out}/m", "--sparsity", "nan"], "argument --sparsity: expected a finite number, got 'nan'"),
    (["prune", "--out", "{out}/m", "--lam=-inf"], "argument --lam: expected a finite number, got '-inf'"),
    (["eval", "--sparsities", "0.2,nan"], "argument --sparsities: expected a finite number, got 'nan' in '0.2,nan'"),
    (["eval", "--guidance-scales", "1.5,inf"], "argument --guidance-scales: expected a finite number, got 'inf'"),
    (["demo", "--guidance-scale", "nan"], "argument --guidance-scale: expected a finite number"),
    # integer flags: floats and out-of-range values refused, not truncated
    (["sample", "--num-samples", "-4"], "argument --num-samples: expected an integer >= 1, got '-4'"),
    (["sample", "--nrow", "0"], "argument --nrow: expected an integer >= 1, got '0'"),
    (["sample", "--labels", "1.7"], "argument --labels: expected an integer, got '1.7'"),
    (["sample", "--labels", "3,-1"], "argument --labels: expected an integer >= 0, got '-1' in '3,-1'"),
    (["sample", "--labels", "1,,2"], "argument --labels: expected comma-separated class ids, got '1,,2'"),
    (["sample", "--labels", "1,10", "--out", "{out}/s.png"], "--labels [10] out of range: this model has classes 0..9"),
    (["sample", "--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
    (["prune", "--out", "{out}/m", "--boundaries", "200.9,600.9"], "argument --boundaries: expected an integer, got '200.9'"),
    (["prune", "--out", "{out}/m", "--boundaries", "600,200"], "argument --boundaries: expected 0 < t_low < t_high, got '600,200'"),
    (["prune", "--out", "{out}/m", "--boundaries", "1,2,3"], "expected 2 comma-separated integer timesteps t_low,t_high, got 3"),
    (["prune", "--out", "{out}/m", "--boundaries", "200,1000"], "--boundaries 200,1000: t_high must be below the 1000 training timesteps"),
    (["prune", "--out", "{out}/m", "--samples-per-stage", "0"], "argument --samples-per-stage: expected an integer >= 1, got '0'"),
    (["prune", "--out", "{out}/m", "--align", "0"], "argument --align: expected an integer >= 1, got '0'"),
    (["demo", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["demo", "--num-samples", "1"], "argument --num-samples: expected an integer >= 2, got '1'"),
    (["eval", "--threads", "-2"], "argument --threads: expected an integer >= 1, got '-2'"),
    # sparsity: CLI terms and the cap flag
    (["prune", "--out", "{out}/m", "--sparsity", "0.95"],
     "--sparsity 0.95 is above the largest sparsity a stage may get, 0.9 (the default cap min(0.9, --sparsity + 0.1)); "
     "lower --sparsity or pass --max-stage-sparsity"),
    (["prune", "--out", "{out}/m", "--sparsity", "0.6", "--max-stage-sparsity", "0.5"],
     "--sparsity 0.6 is above the largest sparsity a stage may get, 0.5 (--max-stage-sparsity)"),
    (["prune", "--out", "{out}/m", "--sparsity", "1.5"], "argument --sparsity: expected a sparsity in [0, 1), got '1.5'"),
    (["prune", "--out", "{out}/m", "--max-stage-sparsity", "1"], "argument --max-stage-sparsity: expected a number in (0, 1), got '1'"),
    (["prune", "--out", "{out}/m", "--sparsity", "0.95", "--max-stage-sparsity", "0.97"],
     "a stage sparsity of 0.97 would remove all 6 attention heads of this model; use --max-stage-sparsity below 0.9167"),
    (["prune", "--out", "{out}/m", "--method", "magnitude", "--sparsity", "0.95"],
     "a stage sparsity of 0.95 would remove all 6 attention heads of this model; use --sparsity below 0.9167"),
    (["prune", "--out", "{out}/m", "--method", "magnitude", "--max-stage-sparsity", "0.5"],
     "--max-stage-sparsity caps the automatic allocation of --method mosaic; it has no effect with --method magnitude"),
    (["prune", "--out", "{out}/m", "--stage-sparsities", "0.1,0.2"], "--stage-sparsities: --method mosaic takes 3 (early,middle,late), got 2"),
    (["prune", "--out", "{out}/m", "--method", "uniform", "--boundaries", "200,600"], "drop --boundaries"),
    (["prune", "--out", "{out}/m", "--M", "0"], "argument --M: expected a number in (0, 1], got '0'"),
    (["prune", "--out", "{out}/m", "--speed-threshold", "0"],
     "argument --speed-threshold: expected a number in (0, 1], got '0'"),
    (["prune", "--out", "{out}/m", "--log-snr-weight=nan"], "argument --log-snr-weight: expected a finite number, got 'nan'"),
    (["demo", "--speed-threshold", "1.5"], "argument --speed-threshold: expected a number in (0, 1], got '1.5'"),
    (["eval", "--lam=inf"], "argument --lam: expected a finite number, got 'inf'"),
    # bug 2: models of another class, folders without a config, invalid configs
    (["prune", "--model", "{in}/unet", "--out", "{out}/m", "--method", "magnitude"],
     "holds a UNet2DModel ({in}/unet/config.json), not a DiTTransformer2DModel"),
    (["prune", "--model", "{in}/noconfig", "--out", "{out}/m"], "has no config.json (nor transformer/config.json)"),
    (["prune", "--model", "{in}/missing", "--out", "{out}/m"], "model folder {in}/missing does not exist"),
    (["prune", "--model", "{in}/afile", "--out", "{out}/m"], "model {in}/afile is a file; pass the folder"),
    (["prune", "--model", "{in}/pipe", "--out", "{out}/m"], "holds a UNet2DModel ({in}/pipe/transformer/config.json)"),
    (["prune", "--model", "{in}/mosaic", "--out", "{out}/m"], "is an already pruned MosaicDiT; pass the dense"),
    (["sample", "--model", "{in}/corrupt", "--out", "{out}/s.png"], "model config {in}/corrupt/config.json is not valid JSON"),
    (["sample", "--model", "{in}/listconfig", "--out", "{out}/s.png"], "holds a JSON list, expected an object"),
    (["sample", "--model", "{in}/unet", "--out", "{out}/s.png"], "holds a UNet2DModel"),
    (["demo", "--model", "{in}/tinydit", "--out", "{out}/d"], "(in_channels, sample_size, classes) = (4, 8, 10)"),
    # calibration files
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib_text.safetensors"], "calib_text.safetensors is not a safetensors file"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib_no_labels.safetensors"], "lacks the tensors ['labels']"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib_float_labels.safetensors"],
     "labels must be integer class ids, got torch.float32"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib.safetensors"],
     "calibration samples are (C, H, W) = (4, 8, 8) but the model expects (1, 16, 16)"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib_label11.safetensors"], "got 11 at index 2"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/calib_nan.safetensors"],
     "calib_nan.safetensors: calibration latents contain NaN/inf at index [1]"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/nope.safetensors"], "--calibration {in}/nope.safetensors: no such file"),
    (["prune", "--out", "{out}/m", "--calibration", "{in}/folder"], "--calibration {in}/folder is a folder; pass the .safetensors file"),
    # devices
    (["prune", "--out", "{out}/m", "--device", "cuda"], "argument --device: 'cuda' needs a CUDA GPU, but torch.cuda.is_available() is False"),
    (["sample", "--device", "cuda:0"], "'cuda:0' needs a CUDA GPU"),
    (["sample", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
    # output locations, checked before any work
    (["prune", "--out", "{in}/afile"], "--out {in}/afile: {in}/afile exists and is a file, not a folder"),
    (["prune", "--out", "{in}/unet", "--method", "magnitude"], "holds the config.json of another model (UNet2DModel)"),
    (["prune", "--out", "{in}/afile/sub"], "{in}/afile is a file, not a folder"),
    (["sample", "--out", "{in}/afile/s.png"], "--out {in}/afile/s.png: {in}/afile is a file, but it must be a folder"),
    (["sample", "--out", "{in}/folder"], "--out {in}/folder is a folder: add --num-images N to sample N images "
                                         "into {in}/folder/samples.npz, or give an image file name for a grid"),
    (["sample", "--out", "{out}/s.txt"], "unknown image type '.txt'"),
    (["demo", "--out", "{in}/afile"], "--out {in}/afile is a file, but it must be a folder"),
    (["eval", "--out", "{in}/afile/e"], "{in}/afile is a file, not a folder"),
    # other usage errors
    (["prune", "--out", "{out}/m", "--bogus"], "unrecognized arguments: --bogus"),
    (["prune"], "the following arguments are required: --out"),
    (["demo", "--methods", "mosaic,foo"], "argument --methods: unknown 'foo' (choose from mosaic, stepwise, uniform, magnitude, searched)"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_bad_input_is_one_line(argv, fragment, inputs, work, capsys):
    code, line = run_case(argv, inputs, work, capsys)
    assert code == EXIT_USAGE, line
    assert fragment.replace("{in}", str(inputs)) in line, line


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write into (for root, whom modes do not stop: /sys)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    probe = Path("/sys") / "mosaicdiff-probe"
    try:
        probe.touch()
    except OSError:
        yield Path("/sys")
        return
    probe.unlink()
    pytest.skip("running as root with a writable /sys: no unwritable folder to test with")


@pytest.mark.parametrize("argv", [
    ["prune", "--out", "{ro}/m", "--method", "magnitude"],
    ["sample", "--out", "{ro}/s.png"],
    ["demo", "--out", "{ro}/d"],
    ["eval", "--out", "{ro}"],
], ids=["prune", "sample", "demo", "eval"])
def test_unwritable_output_refused_before_work(argv, unwritable, work, capsys, monkeypatch):
    import mosaicdiff.api
    import mosaicdiff.core.sampling

    def never(*a, **k):
        raise AssertionError("the long work started before the output folder was checked")

    monkeypatch.setattr(mosaicdiff.core.sampling, "sample", never)
    monkeypatch.setattr(mosaicdiff.api, "prune", never)
    before = sorted(os.listdir(unwritable))
    code = main([a.replace("{ro}", str(unwritable)) for a in argv])
    line = error_line(capsys.readouterr().err, argv[0])
    assert code == EXIT_USAGE and f"--out {unwritable}" in line and f"cannot write into {unwritable}" in line, line
    assert sorted(os.listdir(unwritable)) == before and not os.listdir(work)


# ----------------------------------------------------------------------------- failures of the run

def _raise(exc):
    def f(*args, **kwargs):
        raise exc
    return f


@pytest.mark.parametrize("exc,code,fragment", [
    (RuntimeError("kernel exploded\n  at line 3"), EXIT_FAILURE,
     "RuntimeError: kernel exploded at line 3 (rerun with --debug for the traceback)"),
    (ZeroDivisionError("division by zero"), EXIT_FAILURE, "ZeroDivisionError: division by zero"),
    (OSError(errno.ENOSPC, "No space left on device", "s.png"), EXIT_FAILURE, "s.png: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "s.png"), EXIT_USAGE, "s.png: Permission denied"),
    (FileExistsError("save_pretrained: x exists"), EXIT_USAGE, "save_pretrained: x exists"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, None),
], ids=["runtime", "zerodiv", "enospc", "permission", "exists", "ctrl-c"])
def test_failures_are_one_line(exc, code, fragment, work, capsys, monkeypatch):
    import mosaicdiff.core.sampling

    monkeypatch.setattr(mosaicdiff.core.sampling, "sample", _raise(exc))
    assert main(["sample", "--num-samples", "2", "--steps", "1", "--out", str(work / "s.png"), "--no-progress"]) == code
    err = capsys.readouterr().err
    if fragment is None:
        assert "Traceback" not in err and err.strip().splitlines()[-1] == "mosaicdiff sample: interrupted", err
    else:
        assert fragment in error_line(err, "sample"), err
    assert not os.listdir(work)


def test_safetensors_error_is_input_error(work, capsys, monkeypatch):
    from safetensors import SafetensorError

    import mosaicdiff.zoo

    monkeypatch.setattr(mosaicdiff.zoo, "load_digits_dit", _raise(SafetensorError("header too large")))
    assert main(["sample", "--out", str(work / "s.png")]) == EXIT_USAGE
    assert "not a valid safetensors file: header too large" in error_line(capsys.readouterr().err, "sample")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, work, capsys, monkeypatch):
    import mosaicdiff.core.sampling

    monkeypatch.setattr(mosaicdiff.core.sampling, "sample", _raise(RuntimeError("boom")))
    tail = ["--num-samples", "2", "--out", str(work / "s.png")]
    argv = ["--debug", "sample", *tail] if where == "before" else ["sample", *tail, "--debug"]
    assert main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("mosaicdiff sample: error: RuntimeError: boom")


# ----------------------------------------------------------------------------- bench: help and behaviour agree

def test_bench_passes_unknown_arguments_to_the_suite(monkeypatch):
    import runpy

    seen = {}

    def fake_run_path(path, run_name):
        seen["argv"] = list(sys.argv)
        raise SystemExit(0)

    monkeypatch.setattr(runpy, "run_path", fake_run_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--out", "x", "--stages", "a,b", "--rep-ms", "5"]) == 0
    assert seen["argv"][0].endswith("gpu_suite.py") and seen["argv"][1:] == ["--out", "x", "--stages", "a,b", "--rep-ms", "5"]
    assert main(["bench", "--", "--out", "y"]) == 0 and seen["argv"][1:] == ["--out", "y"]


def test_bench_help_of_the_suite_runs_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out  # the suite's own options


def test_bench_without_gpu_suggests_dry_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--out", "x"]) == EXIT_FAILURE
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out and "--dry-run" in out


# ----------------------------------------------------------------------------- end to end (subprocess)

def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOSAIC_KERNELS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mosaicdiff", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["prune", "--model", "{in}/unet", "--out", "out", "--method", "magnitude", "--steps", "5", "--no-progress"],
     "holds a UNet2DModel"),
    (["sample", "--guidance-scale", "nan", "--out", "nan.png", "--num-samples", "2", "--steps", "2"],
     "argument --guidance-scale: expected a finite number, got 'nan'"),
    (["sample", "--model", "{in}/corrupt", "--out", "s.png"], "is not valid JSON"),
], ids=["unet-model", "nan-guidance", "corrupt-config"])
def test_end_to_end_bad_input(args, fragment, inputs, tmp_path):
    r = _cli([a.replace("{in}", str(inputs)) for a in args], tmp_path)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert fragment in error_line(r.stderr, args[0])
    assert not os.listdir(tmp_path), "output written"


PRUNE_TWICE = """
import mosaicdiff
{prelude}
from mosaicdiff.zoo import load_digits_dit

dense = load_digits_dit()
for _ in range(2):
    m = mosaicdiff.prune(dense, None, 0.5, method="magnitude", num_inference_steps=5, progress=False)
    assert type(m).__name__ == "MosaicDiT", type(m)
import inspect
assert "target_sparsity" in inspect.signature(mosaicdiff.prune).parameters
print("ok")
"""


@pytest.mark.parametrize("prelude", [
    "",
    "import mosaicdiff.api\nimport mosaicdiff.method.pruning as prune_mod\nfrom mosaicdiff.api import prune_stages\n"
    "assert callable(prune_stages) and callable(prune_mod.plan_stages) and callable(mosaicdiff.prune)",
], ids=["plain", "submodule-imported-first"])
def test_prune_callable_twice_in_a_fresh_interpreter(prelude, tmp_path):
    """Bug 3: `mosaicdiff.prune(...)` worked once per process (then 'module' object is not callable)."""
    code = PRUNE_TWICE.replace("{prelude}", prelude)
    env = {**os.environ, "MOSAIC_KERNELS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

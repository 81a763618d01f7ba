"""Loading a folder whose config.json lies about the architecture: refused in one line naming the
field, before anything of the lie's size is allocated (the skeleton is built on the meta device and
compared with the safetensors header first).

Memory is measured in a fresh process from ``/proc/self/status``: ``VmPeak`` (peak address space:
what ``torch.empty`` reserves even when no page is touched) and ``VmHWM`` (peak resident set, as
``ru_maxrss``), each as its growth over the load. Without the meta build the head-dim lie costs
~0.5 GB of address space, the positional-table lie ~2 GB, the U-Net width lie ~4.7 GB and the
layer-count lie ~120 MB (and 1 GB per 3000 layers: the modules' own objects, even on meta, which a
build stops when it makes far more tensors than the weights hold); the allowance below is half the
smallest of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ALLOWED_GROWTH_MB = 64
ROOT = Path(__file__).resolve().parents[2]

#: (family, the lie, the field the error must name)
LIES = [
    ("dit", {"attention_head_dim": 512}, "attention_head_dim=512"),
    ("unet", {"block_out_channels": [1024, 2048]}, "block_out_channels=[1024, 2048]"),
    ("dit", {"sample_size": 4096}, "sample_size=4096"),
    # 1204 transformer blocks instead of 12: even on meta, a build of ~120 MB of modules and seconds
    ("unet", {"layers_per_block": 300}, "a layer or block count of the config does not fit its weights"),
]

_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path

    import mosaicdiff
    from mosaicdiff import families

    def vm():
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        return {k: int(status[k].split()[0]) // 1024 for k in ("VmPeak", "VmHWM")}

    root, lies = Path(sys.argv[1]), json.loads(sys.argv[2])
    classes = {}
    for family in families.FAMILIES:
        if family.name in {name for name, _ in lies}:
            dense = family.testing_module().tiny_dense()
            mosaic = mosaicdiff.prune(dense, None, 0.3, method="magnitude", align=None, progress=False)
            mosaic.save_pretrained(root / family.name)
            family.mosaic_class.from_pretrained(root / family.name)  # lazy imports, allocator warm
            classes[family.name] = family.mosaic_class
    results = []
    for i, (name, edit) in enumerate(lies):
        folder = root / f"lie{i}"
        shutil.copytree(root / name, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        before = vm()
        try:
            classes[name].from_pretrained(folder)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        after = vm()
        results.append({"error": error, **{k: after[k] - before[k] for k in after}})
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status (Linux)")
    root = tmp_path_factory.mktemp("lies")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(root), json.dumps([lie[:2] for lie in LIES])],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(LIES)), ids=[f"{f}-{next(iter(e))}" for f, e, _ in LIES])
def test_a_lying_config_is_refused_before_allocating(results, case):
    family, _, field = LIES[case]
    got = results[case]
    assert got["error"] is not None, f"{family}: the lying config loaded"
    assert got["error"].startswith("ValueError: ") and "\n" not in got["error"], got["error"]
    assert field in got["error"], got["error"]
    assert got["VmPeak"] < ALLOWED_GROWTH_MB and got["VmHWM"] < ALLOWED_GROWTH_MB, got

"""StageGraphRunner bookkeeping on CPU: signatures, re-keying, reset() and the blockers.

Capture is replaced by a fake graph (replay recomputes into the static output buffer), so the
copy-in / replay / clone-out logic and the graph cache run exactly as on a GPU.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mosaicdiff.core.graphs import StageGraphRunner, _Captured


def stage_fn(stage, x, t, labels):
    """A stand-in stage forward whose output depends on every input (and keeps x's shape/dtype)."""
    return x * (stage + 1) + t.to(x.dtype).view(-1, 1, 1, 1) + labels.to(x.dtype).view(-1, 1, 1, 1)


class _FakeGraph:
    def __init__(self, fn, stage, inputs, output):
        self.fn, self.stage, self.inputs, self.output = fn, stage, inputs, output
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.output.copy_(self.fn(self.stage, *self.inputs))


@pytest.fixture
def runner(monkeypatch):
    """A runner whose inputs always look capturable, with a fake capture counting its calls."""
    r = StageGraphRunner(stage_fn)
    r.captures = []

    def capture(stage, inputs):
        r.captures.append(StageGraphRunner._signature(stage, inputs))
        static = tuple(t.clone() for t in inputs)
        out = r._fn(stage, *static)
        return _Captured(_FakeGraph(r._fn, stage, static, out), static, out)

    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))
    monkeypatch.setattr(r, "_capture", capture)
    return r


def _args(batch=2, dtype=torch.float32, seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(dtype)
    return x, torch.full((batch,), 500.0), torch.arange(batch)


def test_new_shapes_and_dtypes_get_new_graphs(runner):
    """Re-keying: a graph per (stage, shapes, dtypes); a known signature replays with new values."""
    calls = [(1, _args(2)), (1, _args(4)), (1, _args(2, size=8)), (1, _args(2, torch.float64)),
             (0, _args(2)), (1, _args(2, seed=5)), (1, _args(4, seed=6))]
    for stage, args in calls:
        got = runner(stage, *args)
        want = stage_fn(stage, *args)
        assert got.shape == want.shape and got.dtype == want.dtype, (stage, got.shape, got.dtype)
        assert torch.equal(got, want), f"stage {stage}, shape {tuple(args[0].shape)}, {args[0].dtype}"
    assert runner.num_graphs == 5 and len(runner.captures) == 5, "the last two calls replay known graphs"
    assert {k[0] for k in runner._graphs} == {0, 1}
    shapes = sorted(k[1][0] for k in runner._graphs)
    assert shapes == [(2, 3, 4, 4)] * 3 + [(2, 3, 8, 8), (4, 3, 4, 4)]


def test_signature_covers_stage_shapes_dtypes_and_device():
    x, t, y = _args(2)
    base = StageGraphRunner._signature(1, (x, t, y))
    assert base == (1, ((2, 3, 4, 4), torch.float32, "cpu"), ((2,), torch.float32, "cpu"), ((2,), torch.int64, "cpu"))
    for other in [StageGraphRunner._signature(0, (x, t, y)),
                  StageGraphRunner._signature(1, (x[:1], t[:1], y[:1])),
                  StageGraphRunner._signature(1, (x.double(), t, y)),
                  StageGraphRunner._signature(1, (x, t, y.int()))]:
        assert other != base


def test_outputs_are_fresh_unless_asked(runner):
    x, t, y = _args(2)
    a = runner(1, x, t, y)
    b = runner(1, x + 1, t, y)
    assert not torch.equal(a, b) and torch.equal(a, stage_fn(1, x, t, y)), "a replay must not overwrite a result"
    runner.clone_output = False
    c = runner(1, x, t, y)
    assert c is runner(1, x, t, y), "clone_output=False returns the static buffer"


def test_reset_drops_graphs_and_failures(runner, monkeypatch):
    x, t, y = _args(2)
    runner(1, x, t, y)
    runner(0, x, t, y)
    assert runner.num_graphs == 2
    runner._failed[("bad",)] = "RuntimeError: boom"
    runner.reset()
    assert runner.num_graphs == 0 and runner.failed == {}
    assert torch.equal(runner(1, x, t, y), stage_fn(1, x, t, y))
    assert runner.num_graphs == 1 and len(runner.captures) == 3, "after reset the signature is captured again"


def test_failed_signature_is_retried_after_reset(runner, monkeypatch):
    good = runner._capture
    attempts = []

    def failing(stage, inputs):
        attempts.append(stage)
        raise RuntimeError("capture broke")

    monkeypatch.setattr(runner, "_capture", failing)
    x, t, y = _args(2)
    for _ in range(2):
        assert torch.equal(runner(1, x, t, y), stage_fn(1, x, t, y))
    assert attempts == [1] and runner.num_graphs == 0 and len(runner.failed) == 1
    monkeypatch.setattr(runner, "_capture", good)
    runner.reset()
    runner(1, x, t, y)
    assert runner.num_graphs == 1 and runner.failed == {}


def _fake(device: str):
    return SimpleNamespace(device=torch.device(device))  # _blocker reads only .device


def test_blockers(monkeypatch):
    blocker = StageGraphRunner._blocker
    assert blocker((torch.zeros(1), torch.zeros(1))) == "inputs are on cpu, not CUDA"
    assert blocker((torch.zeros(1), torch.zeros(1, device="meta"))) == "inputs on several devices ['cpu', 'meta']"
    cuda = (_fake("cuda:0"), _fake("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert blocker(cuda) == "CUDA is not available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert blocker(cuda) == "already inside a CUDA graph capture"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert blocker(cuda) is None
    assert blocker((_fake("cuda:0"), _fake("cuda:1"))).startswith("inputs on several devices")


def test_blocked_inputs_run_eagerly_and_log_each_reason_once(caplog):
    runner = StageGraphRunner(stage_fn)
    x, t, y = _args(2)
    with caplog.at_level(logging.INFO, logger="mosaicdiff.core.graphs"):
        for stage in (0, 1, 0):
            assert torch.equal(runner(stage, x, t, y), stage_fn(stage, x, t, y))
    assert caplog.text.count("running eagerly: inputs are on cpu, not CUDA") == 1
    assert runner.num_graphs == 0 and runner.failed == {}


def test_mosaic_fusion_switch_drops_graphs(monkeypatch):
    from mosaicdiff.families.dit.model import MosaicDiT
    from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_specs

    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense(dense, two_stage_specs(dense)).enable_cuda_graphs(True)
    r = mosaic._graphs
    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))

    def capture(stage, inp):
        static = tuple(t.clone() for t in inp)
        out = r._fn(stage, *static)
        return _Captured(_FakeGraph(r._fn, stage, static, out), static, out)

    monkeypatch.setattr(r, "_capture", capture)
    x, labels = inputs(batch=2)
    with torch.no_grad():
        mosaic(x, timestep=900, class_labels=labels)
        assert r.num_graphs == 1
        mosaic.set_block_boundary_fusion(False)
        assert r.num_graphs == 0, "graphs captured with the fused blocks must not replay unfused"

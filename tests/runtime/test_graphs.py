"""StageGraphRunner / MosaicDiT.enable_cuda_graphs: CPU fallback everywhere, replay on CUDA."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.core import graphs
from mosaicdiff.core.graphs import StageGraphRunner, _Captured
from mosaicdiff.families.dit.model import MosaicDiT
from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_specs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mosaic():
    dense = tiny_dit()
    return MosaicDiT.from_dense(dense, two_stage_specs(dense))


def _run(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


def test_cpu_falls_back_to_eager_and_logs_once(caplog):
    mosaic = _mosaic()
    x, labels = inputs(batch=2)
    eager = [_run(mosaic, x, t, labels) for t in (900, 100)]
    mosaic.enable_cuda_graphs(True)
    assert mosaic.cuda_graphs_enabled and "cuda_graphs=True" in repr(mosaic)
    with caplog.at_level(logging.INFO, logger="mosaicdiff.core.graphs"):
        got = [_run(mosaic, x, t, labels) for t in (900, 100, 900)]
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1]) and torch.equal(got[2], eager[0])
    assert caplog.text.count("running eagerly: inputs are on cpu") == 1
    assert mosaic._graphs.num_graphs == 0
    mosaic.enable_cuda_graphs(False)
    assert not mosaic.cuda_graphs_enabled and torch.equal(_run(mosaic, x, 900, labels), eager[0])


def test_capture_error_falls_back_to_eager(monkeypatch, caplog):
    mosaic = _mosaic()
    runner = StageGraphRunner(mosaic.forward_stage)
    calls = []

    def failing_capture(stage, inputs):
        calls.append(stage)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))
    monkeypatch.setattr(runner, "_capture", failing_capture)
    x, labels = inputs(batch=2)
    t = torch.full((2,), 900.0)
    want = mosaic.forward_stage(1, x, t, labels)
    with caplog.at_level(logging.WARNING, logger="mosaicdiff.core.graphs"):
        outs = [runner(1, x, t, labels) for _ in range(3)]
    assert all(torch.equal(o, want) for o in outs)
    assert calls == [1], "a failed signature is not captured again"
    assert len(runner.failed) == 1 and "not permitted" in next(iter(runner.failed.values()))
    assert caplog.text.count("capture failed for stage 1") == 1


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay recomputes into the static output."""

    def __init__(self, fn, stage, inputs, output):
        self.fn, self.stage, self.inputs, self.output = fn, stage, inputs, output
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.output.copy_(self.fn(self.stage, *self.inputs))


def _fake_capture(runner):
    def capture(stage, inputs):
        static = tuple(t.clone() for t in inputs)
        out = runner._fn(stage, *static)
        return _Captured(_FakeGraph(runner._fn, stage, static, out), static, out)

    return capture


def test_replay_copies_inputs_and_returns_fresh_outputs(monkeypatch):
    """The copy-in / replay / clone-out logic, exercised on CPU with a fake graph."""
    mosaic = _mosaic()
    mosaic.enable_cuda_graphs(True)
    runner = mosaic._graphs
    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))
    monkeypatch.setattr(runner, "_capture", _fake_capture(runner))
    x, labels = inputs(batch=2)
    x2 = torch.randn_like(x)
    out_a = _run(mosaic, x, 900, labels)
    out_b = _run(mosaic, x2, 950, labels)  # same stage and signature: replay with new inputs
    out_c = _run(mosaic, x, 100, labels)   # other stage: a second graph
    assert runner.num_graphs == 2
    graph = next(iter(runner._graphs.values())).graph
    assert graph.replays == 2
    mosaic.enable_cuda_graphs(False)
    assert torch.equal(out_a, _run(mosaic, x, 900, labels)), "first output must not be overwritten by replay"
    assert torch.equal(out_b, _run(mosaic, x2, 950, labels))
    assert torch.equal(out_c, _run(mosaic, x, 100, labels))


def test_moving_the_model_drops_graphs(monkeypatch):
    mosaic = _mosaic().enable_cuda_graphs(True)
    runner = mosaic._graphs
    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))
    monkeypatch.setattr(runner, "_capture", _fake_capture(runner))
    x, labels = inputs(batch=2)
    _run(mosaic, x, 900, labels)
    assert runner.num_graphs == 1
    mosaic.to(torch.float32)
    assert runner.num_graphs == 0


def test_runner_validates_arguments():
    with pytest.raises(ValueError, match="warmup_iters must be >= 1"):
        StageGraphRunner(lambda *a: None, warmup_iters=0)
    assert graphs.StageGraphRunner._blocker((torch.zeros(1),)) == "inputs are on cpu, not CUDA"


# ------------------------------------------------------------------ CUDA only


@needs_cuda
def test_cuda_graphs_match_eager_on_gpu():
    mosaic = _mosaic().to("cuda")
    x, labels = (t.cuda() for t in inputs(batch=2))
    eager = {t: _run(mosaic, x, t, labels) for t in (900, 100)}
    mosaic.enable_cuda_graphs(True)
    for _ in range(2):
        for t in (900, 100):
            assert_close(_run(mosaic, x, torch.tensor([t, t], device="cuda"), labels), eager[t],
                         atol=1e-5, rtol=1e-5, msg=lambda m: f"graph replay t={t}: {m}")
    assert mosaic._graphs.num_graphs == 2 and not mosaic._graphs.failed
    x4, labels4 = (t.cuda() for t in inputs(batch=4))
    mosaic.enable_cuda_graphs(False)
    want4 = _run(mosaic, x4, 900, labels4)
    mosaic.enable_cuda_graphs(True)
    assert_close(_run(mosaic, x4, 900, labels4), want4, atol=1e-5, rtol=1e-5)
    assert mosaic._graphs.num_graphs == 1


@needs_cuda
def test_cuda_graphs_in_pipeline_match_eager():
    from tests.runtime.test_mosaic import _pipe, _sample, _tiny_vae

    dense = tiny_dit(num_classes=1000)
    mosaic = MosaicDiT.from_dense(dense, two_stage_specs(dense)).to("cuda")
    pipe = _pipe(mosaic, _tiny_vae().to("cuda"))
    want = _sample(pipe, steps=4)
    mosaic.enable_cuda_graphs(True)
    got = _sample(pipe, steps=4)
    assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"pipeline with graphs: {m}")
    assert mosaic._graphs.num_graphs == 2

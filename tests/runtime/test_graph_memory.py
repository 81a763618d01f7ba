"""CUDA-graph memory per stage, on CPU: capture faked below `StageGraphRunner._capture` (the
warm-up, the recording and the device's reserved bytes), so the runner's own bookkeeping and
`memory_report`'s ``graph_bytes`` run as on a GPU.

Each stage's fake recording reserves a different, known number of bytes per batch row (and the
warm-up reserves some too, which is the caching allocator's, not the graph's): a byte attributed to
another stage, to the warm-up or counted twice fails the expected totals.
"""

from __future__ import annotations

import pytest
import torch

from mosaicdiff.core.graphs import StageGraphRunner
from mosaicdiff.families.dit.model import MosaicDiT
from tests.runtime.dit_helpers import inputs, tiny_dit, two_stage_specs

#: Bytes the fake recording of a stage reserves per batch row, by stage name (two stages: late, early).
COST = {"late": 1000, "early": 70}
WARMUP_BYTES = 5_000_000


class FakeGraph:
    def __init__(self, fn, stage, inputs, output):
        self.fn, self.stage, self.inputs, self.output = fn, stage, inputs, output

    def replay(self):
        self.output.copy_(self.fn(self.stage, *self.inputs))


class FakeDevice:
    """The reserved bytes of a pretend device, grown by the fake warm-up and recording."""

    def __init__(self, runner: StageGraphRunner, names: list[str]):
        self.reserved = 0
        self.runner, self.names = runner, names

    def warm_up(self, stage, static):
        self.reserved += WARMUP_BYTES

    def record(self, stage, static):
        output = self.runner._fn(stage, *static)
        self.reserved += COST[self.names[stage]] * static[0].shape[0]
        return FakeGraph(self.runner._fn, stage, static, output), output


@pytest.fixture
def mosaic(monkeypatch):
    dense = tiny_dit()
    model = MosaicDiT.from_dense(dense, two_stage_specs(dense)).enable_cuda_graphs(True)
    monkeypatch.setattr(StageGraphRunner, "_blocker", staticmethod(lambda inputs: None))
    _fake_device(monkeypatch, model)
    return model


def _fake_device(monkeypatch, model) -> FakeDevice:
    runner = model._graphs
    device = FakeDevice(runner, model.stage_names)
    monkeypatch.setattr(runner, "_warm_up", device.warm_up)
    monkeypatch.setattr(runner, "_record", device.record)
    monkeypatch.setattr(runner, "_pool_bytes", lambda dev: device.reserved)
    return device


def _forward(model, t: int, batch: int) -> None:
    x, labels = inputs(batch=batch)
    with torch.no_grad():
        model(x, timestep=t, class_labels=labels)


def test_memory_report_attributes_each_capture_to_its_stage(mosaic):
    assert mosaic.memory_report()["graph_bytes"] == {"late": 0, "early": 0}, "nothing captured yet"
    for t, batch in ((900, 2), (100, 2), (900, 3), (900, 2), (100, 2)):  # the last two replay
        _forward(mosaic, t, batch)
    assert mosaic._graphs.num_graphs == 3
    report = mosaic.memory_report()
    assert report["graph_bytes"] == {"early": COST["early"] * (2 + 3), "late": COST["late"] * 2}
    assert list(report["graph_bytes"]) == mosaic.stage_names
    late = mosaic.stage_names.index("late")
    by_signature = mosaic._graphs.graph_bytes
    assert sorted(v for k, v in by_signature.items() if k[0] == late) == [COST["late"] * 2]


def test_graph_bytes_drop_with_the_graphs(mosaic, monkeypatch):
    _forward(mosaic, 900, 2)
    assert mosaic.memory_report()["graph_bytes"]["early"] == COST["early"] * 2
    mosaic.set_block_boundary_fusion(False)  # drops the captured graphs
    assert mosaic.memory_report()["graph_bytes"] == {"late": 0, "early": 0}
    mosaic.enable_cuda_graphs(False)
    report = mosaic.memory_report()
    assert report["graph_bytes"] == {"late": 0, "early": 0}
    assert report["mosaic_bytes"] == sum(s["bytes"] for s in report["stages"].values()) + report["shared_bytes"] \
        + report["producer_bytes"], "graph memory is not part of the weights' bytes"


def test_a_failed_capture_costs_nothing(mosaic, monkeypatch):
    runner = mosaic._graphs

    def broken(stage, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_record", broken)
    _forward(mosaic, 900, 2)
    assert len(runner.failed) == 1 and mosaic.memory_report()["graph_bytes"] == {"late": 0, "early": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_capture_reserves_pool_memory_for_its_stage_only():
    """On a GPU: the first graph opens the private pool (at least one segment), so its stage
    shows bytes; the stage never run shows none."""
    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense(dense, two_stage_specs(dense)).to("cuda").enable_cuda_graphs(True)
    x, labels = (t.cuda() for t in inputs(batch=2))
    with torch.no_grad():
        mosaic(x, timestep=900, class_labels=labels)
    assert mosaic._graphs.num_graphs == 1 and not mosaic._graphs.failed
    report = mosaic.memory_report()["graph_bytes"]
    assert report["early"] > 0 and report["late"] == 0, report

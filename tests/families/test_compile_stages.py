"""``torch.compile(mosaic, fullgraph=True)`` and regional compilation, for every family (issue 23, item 1).

Dynamo's own counters say what was compiled (`torch._dynamo.testing.CompileCounterWithBackend`
counts every compiled frame, recompiles included; ``counters["stats"]["unique_graphs"]`` the
graphs). A DDIM run passes the scheduler's timesteps through the three stages twice: the first
pass may compile, at most one graph per stage; the second compiles nothing. The backend is
``"eager"`` (dynamo's graph run by torch: what is traced, guarded and compiled is the same as
with inductor, minus inductor's minutes of CPU codegen); one small test runs inductor.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from mosaicdiff import families
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.testing import assert_close

from tests.families.conformance import three_stage_mosaic

#: fp32 on CPU, outputs O(1): the compiled graph may sum in another order.
ATOL, RTOL = 1e-5, 1e-5
#: The timestep forms samplers pass: a Python int, a 0-d CPU tensor (the scheduler's own), and
#: ``DiTPipeline``'s (B,) tensor expanded from one value (stride 0).
FORMS = {
    "int": lambda t, batch: int(t),
    "0d": lambda t, batch: t.clone(),
    "batch": lambda t, batch: t.reshape(1).expand(batch),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with empty dynamo caches and counters, and torch's op backend."""
    from mosaic_kernels import ops

    torch._dynamo.reset()
    counters.clear()
    with ops.use_backend("torch"):
        yield
    torch._dynamo.reset()


class Kit:
    def __init__(self, family):
        self.testing = family.testing_module()
        dense = self.testing.tiny_dense()
        self.x, self.cond = self.testing.tiny_inputs(dense, 2)
        self.mosaic = three_stage_mosaic(family, dense, share_producers=True)

    def call(self, model, t):
        return self.testing.call(model, self.x, t, self.cond)


@pytest.fixture(scope="module", params=[f.name for f in families.FAMILIES])
def kit(request):
    return Kit(next(f for f in families.FAMILIES if f.name == request.param))


def ddim_timesteps(steps: int) -> torch.Tensor:
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def run_passes(kit, compiled, counter, form, steps):
    """Compiled frames after each of two passes over a DDIM run, and the last pass's outputs."""
    frames, outputs = [], []
    for _ in range(2):
        outputs = [kit.call(compiled, FORMS[form](t, kit.x.shape[0])) for t in ddim_timesteps(steps)]
        frames.append(counter.frame_count)
    return frames, outputs


def steps_for(kit) -> int:
    # the U-Net's tiny model is the slowest to trace and run; 6 DDIM steps cross its three stages too
    return 6 if type(kit.mosaic).__name__ == "MosaicUNet" else 50


def stages_crossed(kit, steps: int) -> set[int]:
    return {kit.mosaic.stage_for(int(t)) for t in ddim_timesteps(steps)}


@pytest.mark.parametrize("form", ["0d", "batch"])
def test_tensor_timesteps_compile_one_graph_for_all_stages(kit, form):
    """A tensor timestep: one graph (``torch.cond`` over the stages), no recompile as the stage changes,
    each step's output the eager one."""
    steps = steps_for(kit)
    assert stages_crossed(kit, steps) == {0, 1, 2}
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(kit.mosaic, fullgraph=True, backend=counter)
    frames, outputs = run_passes(kit, compiled, counter, form, steps)
    assert frames == [1, 1], f"compiled frames after each pass: {frames}"
    assert counters["stats"]["unique_graphs"] == 1
    for t, out in list(zip(ddim_timesteps(steps), outputs))[::3]:
        assert_close(out, kit.call(kit.mosaic, FORMS[form](t, kit.x.shape[0])), atol=ATOL, rtol=RTOL)


def skip_without_number_timesteps(kit) -> None:
    """A family whose forward takes no Python int (Flux: ``t / 1000``, a float dynamo specialises)."""
    if not getattr(kit.testing, "NUMBER_TIMESTEPS", True):
        pytest.skip(f"{type(kit.mosaic).__name__} is called with tensor timesteps only")


def test_int_timesteps_compile_one_graph_per_stage_when_dynamic(kit):
    """A Python int with ``dynamic=True``: the stage is a guard on the value's range, one graph per
    stage, none after the first pass."""
    skip_without_number_timesteps(kit)
    steps = steps_for(kit)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(kit.mosaic, fullgraph=True, backend=counter, dynamic=True)
    frames, outputs = run_passes(kit, compiled, counter, "int", steps)
    assert frames == [3, 3], f"compiled frames after each pass: {frames}"
    t = ddim_timesteps(steps)[-1]
    assert_close(outputs[-1], kit.call(kit.mosaic, int(t)), atol=ATOL, rtol=RTOL)


def test_int_timesteps_default_dynamic_specialise_the_first_value_only(kit):
    """By default dynamo specialises the first int and makes it dynamic at the second: one extra
    graph in the first stage, still nothing compiled after the first pass."""
    skip_without_number_timesteps(kit)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(kit.mosaic, fullgraph=True, backend=counter)
    frames, _ = run_passes(kit, compiled, counter, "int", steps_for(kit))
    assert frames[0] <= kit.mosaic.num_stages + 1 and frames[1] == frames[0], frames


def test_mixed_batch_and_out_of_range_timestep_under_compile():
    """A batch whose rows fall in several stages gives each row its own stage's output, as eagerly;
    a timestep outside every stage fails in the graph."""
    kit = Kit(next(f for f in families.FAMILIES if f.name == "dit"))
    rows = torch.tensor([900, 100])  # first and last stage
    compiled = torch.compile(kit.mosaic, fullgraph=True, backend="eager")
    assert_close(kit.call(compiled, rows), kit.call(kit.mosaic, rows), atol=ATOL, rtol=RTOL)
    with pytest.raises(RuntimeError, match="outside every stage"):
        kit.call(compiled, torch.tensor(1000))


def test_regional_compilation_is_fullgraph_and_does_not_recompile(kit):
    """``compile_repeated_blocks(fullgraph=True)``: the compact blocks compile without a graph break,
    a graph per block shape at most, none after the first pass."""
    steps = steps_for(kit)
    eager = kit.call(kit.mosaic, ddim_timesteps(steps)[-1])
    counter = CompileCounterWithBackend("eager")
    model = type(kit.mosaic).from_config(kit.mosaic.config)
    model.load_state_dict(kit.mosaic.state_dict())
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    frames, outputs = run_passes(kit, model, counter, "0d", steps)
    shapes = {tuple(p.shape for p in b.parameters()) for blocks in model.stage_blocks for b in blocks}
    assert 1 <= frames[0] <= 2 * len(shapes) and frames[1] == frames[0], frames
    assert_close(outputs[-1], eager, atol=ATOL, rtol=RTOL)


def test_inductor_compiles_the_engine_dense_dit():
    """The inductor backend (CPU codegen) on a one-stage DiT mosaic (the engine dense: no
    ``torch.cond``, which makes inductor compile every stage, about 30 s more on this CPU): one
    graph, the eager outputs. The stage dispatch through inductor was measured by hand (the report)."""
    from mosaicdiff.families.dit import testing
    from mosaicdiff.families.dit.model import MosaicDiT
    from torch._inductor import config as inductor_config

    dense = testing.tiny_dense()
    x, cond = testing.tiny_inputs(dense, 2)
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    compiled = torch.compile(mosaic, fullgraph=True, backend="inductor")
    with inductor_config.patch(compile_threads=1):  # no worker pool to start for a few small kernels
        for t in (900, 50):
            t = torch.tensor(t)
            assert_close(testing.call(compiled, x, t, cond), testing.call(mosaic, x, t, cond), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1

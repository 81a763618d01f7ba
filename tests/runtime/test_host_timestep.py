"""The stage is read from a host-side timestep: no device sync per forward (CPU + GPU checks)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.core.sampling import sample
from tests.runtime.dit_helpers import ATOL, RTOL, inputs, tiny_dit

HAS_CUDA = torch.cuda.is_available()


class _Recorder(torch.nn.Module):
    """Wraps a model and keeps the timestep argument of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.seen: list = []
        if hasattr(model, "accepts_host_timestep"):
            self.accepts_host_timestep = model.accepts_host_timestep

    def forward(self, x, timestep=None, class_labels=None):
        self.seen.append(timestep)
        return self.model(x, timestep=timestep, class_labels=class_labels)


@pytest.mark.parametrize("engine", [True, False], ids=["mosaic", "diffusers"])
def test_sample_hands_host_timesteps_to_the_engine_and_contiguous_ones_to_others(engine):
    dense = tiny_dit()
    model = _Recorder(MosaicDiT.from_dense_unpruned(dense) if engine else dense)
    sample(model, [1, 2], num_inference_steps=3, guidance_scale=2.0, progress=False,
           generator=torch.Generator().manual_seed(0))
    assert len(model.seen) == 3
    for t in model.seen:
        assert isinstance(t, torch.Tensor) and t.shape == (4,) and t.dtype == torch.long
        assert t.is_contiguous() and t.stride() == (1,), "an expanded stride-0 timestep recompiles torch.compile"
        assert t.device.type == "cpu"  # on CUDA: the engine's stays on the host, the others' on the device
        assert bool((t == t[0]).all())


def test_host_tensor_forms_match_dense():
    dense = tiny_dit()
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    x, labels = inputs(batch=2)
    with torch.no_grad():
        want = dense(x, timestep=torch.tensor([321, 321]), class_labels=labels).sample
        for t in (torch.full((2,), 321, dtype=torch.long), torch.tensor([321.0]), 321):
            got = mosaic(x, timestep=t, class_labels=labels).sample
            assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"timestep {t!r}: {m}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: checks that a forward never syncs the device")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_forward_with_host_timestep_does_not_sync(graphs):
    dense = tiny_dit().cuda()
    mosaic = MosaicDiT.from_dense_unpruned(dense).enable_cuda_graphs(graphs)
    x, labels = (t.cuda() for t in inputs(batch=2))
    t_host = torch.full((2,), 400, dtype=torch.long)
    with torch.no_grad():
        mosaic(x, timestep=t_host, class_labels=labels)  # first call: capture, config selection
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = mosaic(x, timestep=t_host, class_labels=labels).sample
            out = mosaic(x, timestep=401, class_labels=labels).sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = dense(x, timestep=torch.full((2,), 401, device="cuda"), class_labels=labels).sample
    assert_close(out, want, atol=1e-4, rtol=1e-4)

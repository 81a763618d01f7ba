"""`MosaicUNet.forward` with inputs diffusers' U-Net would meet with a raw matmul or ``TypeError``:
one line naming the argument; and a batch whose timesteps differ but fall in one stage is run, as
by `MosaicDiT` (the conformance suite checks batches spanning stages)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.api import prune_stages
from mosaicdiff.families.unet import testing
from mosaicdiff.families.unet.model import MosaicUNet


@pytest.fixture(scope="module")
def kit():
    from mosaic_kernels import ops

    dense = testing.tiny_dense()
    stages = prune_stages(dense, None, 0.4, pruner="magnitude", boundaries=(300, 700),
                          stage_sparsities=(0.5, 0.25, 0.5), align=None, progress=False, share_producers=True)
    with ops.use_backend("torch"):
        yield MosaicUNet.from_dense(dense, stages), *testing.tiny_inputs(dense, 2)


def test_timesteps_of_one_stage_run_as_one_batch(kit):
    mosaic, x, cond = kit
    t = torch.tensor([900, 800])  # both in the early stage [700, 1000)
    got = testing.call(mosaic, x, t, cond)
    rows = []
    for i in range(2):
        one = {"encoder_hidden_states": cond["encoder_hidden_states"][i:i + 1],
               "added_cond_kwargs": {k: v[i:i + 1] for k, v in cond["added_cond_kwargs"].items()}}
        rows.append(testing.call(mosaic, x[i:i + 1], t[i:i + 1], one))
    assert_close(got, torch.cat(rows), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("change,error,message", [
    ({"encoder_hidden_states": torch.randn(2, 7, 32)}, ValueError,
     r"encoder_hidden_states must be \(2, S, 64\): .* got \(2, 7, 32\)$"),
    ({"encoder_hidden_states": torch.randn(3, 7, 64)}, ValueError,
     r"encoder_hidden_states must be \(2, S, 64\): .* got \(3, 7, 64\)$"),
    ({"added_cond_kwargs": None}, TypeError,
     r"this U-Net is SDXL-style \(addition_embed_type='text_time'\): pass added_cond_kwargs="
     r"\{'text_embeds': \(2, 32\), 'time_ids': \(2, 6\)\}, got NoneType$"),
    ({"added_cond_kwargs": {"text_embeds": torch.randn(2, 32)}}, TypeError,
     r"this U-Net is SDXL-style .* got \['text_embeds'\]$"),
    ({"added_cond_kwargs": {"text_embeds": torch.randn(2, 31), "time_ids": torch.zeros(2, 6)}}, ValueError,
     r"added_cond_kwargs\['text_embeds'\] must be \(2, 32\), got \(2, 31\)$"),
    ({"timestep": torch.tensor([[900], [800]])}, ValueError,
     r"timestep must be a number, a 0-d tensor or a \(2,\) tensor, got shape \(2, 1\)$"),
])
def test_bad_inputs_are_named_in_one_line(kit, change, error, message):
    mosaic, x, cond = kit
    kwargs = {**cond, "timestep": torch.tensor([900, 800]), **change}
    with pytest.raises(error, match=rf"^MosaicUNet\.forward: {message}") as info:
        mosaic(x, **kwargs)
    assert "\n" not in str(info.value)

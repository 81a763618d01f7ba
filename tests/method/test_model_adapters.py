"""Model adapters: `mosaicdiff.prune` picks one by the model's class, refuses unknown models in one
line, and the method reaches the model only through it (a second, fake family proves the seam)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mosaicdiff
import mosaicdiff.families as models
from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import Calibration, cat_rows, collect_hessians, take_rows
from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, linear_bias
from mosaicdiff.families.dit.adapter import DIT
from mosaicdiff.families.dit.model import MosaicDiT


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


class _Compiled(nn.Module):
    """Stands in for a ``torch.compile`` wrapper (``_orig_mod``)."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_the_dit_family_is_picked_by_class_also_through_a_compile_wrapper():
    dense = tiny_dit()
    for model in (dense, _Compiled(dense)):
        family = models.family_for(model)
        assert family.adapter is DIT and family.mosaic_class is MosaicDiT


class UNet2DConditionModel(nn.Module):  # named like a supported class, but not diffusers' (adapters check the class)
    pass


@pytest.mark.parametrize("model, name", [(nn.Linear(2, 2), "Linear"), (UNet2DConditionModel(), "UNet2DConditionModel")])
def test_an_unknown_model_is_refused_in_one_line(model, name):
    calib = Calibration(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), null_class=10)
    with pytest.raises(ValueError) as info:
        mosaicdiff.prune(model, calib, 0.3, progress=False)
    message = str(info.value)
    assert message == (f"mosaicdiff.prune: no model adapter for this model; supported: diffusers "
                       f"DiTTransformer2DModel, diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL), diffusers "
                       f"PixArtTransformer2DModel (PixArt-alpha, PixArt-Sigma), diffusers SD3Transformer2DModel (SD3, "
                       f"SD3.5), diffusers FluxTransformer2DModel (FLUX.1); got {name} "
                       f"(see docs/adding_a_model.md to add one)")
    assert "\n" not in message


# ------------------------------------------------------------------ a second family through the seam


class _GegluBlock(nn.Module):
    """One MLP block with a GEGLU producer (value and gate halves in one linear, as SDXL's ``ff``)."""

    def __init__(self, width=8, hidden=12):
        super().__init__()
        self.proj_in = nn.Linear(width, 2 * hidden)
        self.proj_out = nn.Linear(hidden, width)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return x + self.proj_out(value * torch.nn.functional.gelu(gate))


class _GegluModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList([_GegluBlock(), _GegluBlock()])
        self.embed = nn.Embedding(4, 8)

    def forward(self, x, t, condition):  # x: (B, 8) tokens; condition: a dict, like text embeddings
        h = x + self.embed(condition["ids"]) + condition["bias"]
        for block in self.blocks:
            h = block(h)
        return h


def _geglu_rows(cols: torch.Tensor, hidden: int = 12) -> torch.Tensor:
    return torch.cat([cols, cols + hidden])


class _GegluAdapter(ModelAdapter):
    name = "geglu"

    def handles(self, model):
        return isinstance(model, _GegluModel)

    def validate(self, model):
        pass

    def blocks(self, model):
        return model.blocks

    def groups(self, block):
        return {"ff": PrunableGroup("channels", block.proj_out, (block.proj_in,), 1, _geglu_rows)}

    def run(self, model, x_t, t, condition):
        return model(x_t, t, condition)

    def check_calibration(self, model, calibration):
        pass

    def dense_block(self, block):
        return {"kept": torch.arange(12)}

    def compact_block(self, block, pruned):
        return {"kept": pruned["ff"].kept, "pruned": pruned["ff"]}

    def block_widths(self, block, weights):
        return {"mlp": int(weights["kept"].numel())}

    def shared_skeleton(self, model):
        return model.embed


def test_collect_hessians_runs_any_adapter_with_a_dict_condition():
    model = _GegluModel()
    x = torch.randn(6, 8)
    condition = {"ids": torch.tensor([0, 1, 2, 3, 0, 1]), "bias": torch.randn(6, 8)}
    hessians = collect_hessians(model, x, torch.zeros(6, dtype=torch.long), condition, batch_size=4,
                                progress=False, adapter=_GegluAdapter())
    # independent reference: the consumer's inputs computed by hand
    with torch.no_grad():
        h = x + model.embed(condition["ids"]) + condition["bias"]
        for block, got in zip(model.blocks, hessians):
            value, gate = block.proj_in(h).chunk(2, dim=-1)
            inp = (value * torch.nn.functional.gelu(gate)).double()
            # float32 activations: the hooked forward and this one may use other BLAS kernels
            torch.testing.assert_close(got["ff"], inp.T @ inp / inp.shape[0], rtol=1e-5, atol=1e-6)
            h = block(h)
    both = cat_rows(take_rows(condition, slice(0, 2)), take_rows(condition, torch.tensor([5])))
    assert both["ids"].tolist() == [0, 1, 1] and torch.equal(both["bias"][2], condition["bias"][5])


def test_a_geglu_group_slices_both_producer_halves():
    """Magnitude pruning (no compensation) of a GEGLU MLP equals the dense MLP with the dropped
    channels' consumer columns zeroed: so the producer kept rows c and c + hidden of each channel."""
    block = _GegluBlock()
    group = _GegluAdapter().groups(block)["ff"]
    pruned = compact.prune_group(group, None, 0.5, method="magnitude", align=None)
    kept = pruned.kept
    assert kept.numel() == 6 and torch.equal(kept, kept.sort().values)
    x = torch.randn(5, 8)
    with torch.no_grad():
        value, gate = torch.nn.functional.linear(x, pruned.producer_weights[0], pruned.producer_biases[0]).chunk(2, -1)
        got = x + torch.nn.functional.linear(value * torch.nn.functional.gelu(gate), pruned.consumer_weight,
                                             pruned.consumer_bias)
        ref = _GegluBlock()
        ref.load_state_dict(block.state_dict())
        dropped = torch.ones(12, dtype=torch.bool)
        dropped[kept] = False
        ref.proj_out.weight[:, dropped] = 0
        want = ref(x)
    torch.testing.assert_close(got, want)
    assert torch.equal(pruned.consumer_bias, linear_bias(block.proj_out))


def test_prune_dispatches_through_the_registered_family(monkeypatch):
    """A family registered in `mosaicdiff.families.FAMILIES` is pruned without touching the method."""
    built = {}

    class _Mosaic:
        @classmethod
        def from_dense(cls, dense, stages, *, source, meta, share_producers):
            built.update(stages=stages, source=source, meta=meta, share_producers=share_producers)
            return "mosaic"

    family = models.Family("geglu", "the test GEGLU model", _GegluAdapter(), _Mosaic)
    monkeypatch.setattr(models, "FAMILIES", [*models.FAMILIES, family])
    model = _GegluModel()
    out = mosaicdiff.prune(model, None, 0.25, method="magnitude", align=None, progress=False)
    assert out == "mosaic" and built["source"] == "_GegluModel"
    (stage,) = built["stages"]
    assert stage.name == "all" and [b["kept"].numel() for b in stage.blocks] == [9, 9]
    assert built["meta"]["stage_widths"] == {"all": {"mlp": 9}}

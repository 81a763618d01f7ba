"""ConditionedCalibration: one calibration type for every family.

Conditions are the dense model's forward keyword arguments: tensors with one row per latent (and
nested dicts of them) are split with the latents, everything else is passed unchanged to every
forward; null conditions are one row (broadcast) or one per latent. `Calibration` (DiT) and
`TextCalibration` (U-Net) are thin constructors of it: pruning with either or with the
equivalent hand-built `ConditionedCalibration` gives the same stages.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff.api import prune, prune_stages
from mosaicdiff.calibrate import Calibration, ConditionedCalibration, Shared, TextCalibration
from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup
from mosaicdiff.families.dit.adapter import DIT
from mosaicdiff.families.unet.adapter import UNET
from mosaicdiff.method.calibrate import collect_hessians, prepare_calibration, stage_inputs
from tests.method.test_unet_adapter import TEXT, TIME_IDS, tiny_unet

N = 4


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def latents_marked(n: int = N) -> torch.Tensor:
    """Latent i is the constant i: at t = 0 (abar ~ 1) a noised row still says which latent it is."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 8, 8).contiguous()


def which_latent(x_t: torch.Tensor) -> torch.Tensor:
    return x_t.flatten(1).mean(1).round().long()


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- a family with no custom run


class _ToyModel(nn.Module):
    """forward(hidden_states, timestep, **conditions), as diffusers transformers: records every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.proj_in = nn.Linear(4 * 8 * 8, 6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6)])
        self.calls: list[dict] = []

    def forward(self, hidden_states, timestep, *, emb, added, txt_ids, scale, mode=None):
        self.calls.append(dict(hidden_states=hidden_states, timestep=timestep, emb=emb, added=added,
                               txt_ids=txt_ids, scale=scale, mode=mode))
        h = self.proj_in(hidden_states.flatten(1)) + scale * emb + added["text"].sum(-1, keepdim=True)
        return self.blocks[0](h + txt_ids.sum())


class _ToyAdapter(ModelAdapter):
    name = "toy"

    def handles(self, model):
        return isinstance(model, _ToyModel)

    def validate(self, model):
        pass

    def blocks(self, model):
        return model.blocks

    def groups(self, block):
        return {"lin": PrunableGroup("channels", block, (), 1)}

    def check_calibration(self, model, calibration):
        pass

    def dense_block(self, block):
        return None

    def compact_block(self, block, pruned):
        return None

    def block_widths(self, block, weights):
        return {}

    def shared_skeleton(self, model):
        return nn.Identity()


def toy_calibration(null_emb=None, **kw) -> ConditionedCalibration:
    g = torch.Generator().manual_seed(0)
    conditions = {
        "emb": torch.arange(N, dtype=torch.float32).view(N, 1).expand(N, 6).contiguous(),  # row i: i
        "added": {"text": torch.randn(N, 2, generator=g), "ids": torch.randn(1, 6, generator=g)},
        "txt_ids": torch.randn(5, 3, generator=g),  # another first dim: passed unchanged
        "scale": 0.5,  # not a tensor: passed unchanged
        "mode": Shared(torch.ones(N)),  # N rows, but marked shared
    }
    nulls = {"emb": -1 - torch.arange(N, dtype=torch.float32).view(N, 1).expand(N, 6) if null_emb is None
             else null_emb, "added": {"text": torch.zeros(1, 2)}}
    return ConditionedCalibration(latents_marked(), conditions, nulls, **kw)


def test_rows_are_split_with_the_latents_and_the_rest_passed_unchanged():
    calib = toy_calibration()
    cond = calib.conditions
    assert set(cond) == {"emb", "added", "txt_ids", "scale", "mode"} and cond["scale"] == 0.5
    assert cond["txt_ids"].shape == (5, 3) and cond["mode"].shape == (N,), "given values, unwrapped"
    x_t, t, rows = stage_inputs(calib, 0, 1, 10, generator=torch.Generator().manual_seed(4))
    assert x_t.shape[0] == 20 and torch.equal(x_t[:10], x_t[10:])
    drawn = which_latent(x_t[:10])
    counts = torch.bincount(drawn, minlength=N)
    assert counts.sum() == 10 and counts.min() >= 2 and counts.max() <= 3, f"cycles through the latents: {counts}"
    # the rows of every split entry are the drawn latents' rows, then their null rows
    assert torch.equal(rows["emb"][:10, 0].long(), drawn)
    assert torch.equal(rows["emb"][10:, 0].long(), -1 - drawn), "per-row nulls: taken with the same latents"
    text = calib.conditions["added"]["text"]
    assert torch.equal(rows["added"]["text"][:10], text[drawn])
    assert torch.equal(rows["added"]["text"][10:], torch.zeros(10, 2)), "a one-row null: every latent"
    for shared in (rows["txt_ids"], rows["scale"], rows["mode"], rows["added"]["ids"]):
        assert isinstance(shared, Shared)
    assert torch.equal(rows["txt_ids"].value, cond["txt_ids"])

    # the forward receives plain keyword arguments per batch: split rows sliced, the rest whole
    model = _ToyModel()
    hessians = collect_hessians(model, x_t, t, rows, batch_size=8, progress=False, adapter=_ToyAdapter())
    assert [c["hidden_states"].shape[0] for c in model.calls] == [8, 8, 4]
    first, last = model.calls[0], model.calls[-1]
    assert torch.equal(first["emb"], rows["emb"][:8]) and torch.equal(last["emb"], rows["emb"][16:])
    assert torch.equal(last["added"]["text"], torch.zeros(4, 2))
    for call in model.calls:
        assert torch.equal(call["txt_ids"], cond["txt_ids"]) and call["scale"] == 0.5
        assert torch.equal(call["mode"], torch.ones(N)) and torch.equal(call["added"]["ids"], cond["added"]["ids"])
    # the Hessian is that of the inputs the forward built from those arguments (an independent reference)
    with torch.no_grad():
        h = model.proj_in(x_t.flatten(1)) + 0.5 * rows["emb"] + rows["added"]["text"].sum(-1, keepdim=True)
        h = (h + cond["txt_ids"].sum()).double()
    assert_close(hessians[0]["lin"], h.T @ h / h.shape[0])


def test_null_conditions_one_row_vs_per_row_and_omitted_keys():
    one = toy_calibration(null_emb=torch.full((1, 6), 7.0))
    per_row = toy_calibration()
    index = torch.tensor([3, 1, 1])
    assert torch.equal(one.null_condition_rows(index)["emb"], torch.full((3, 6), 7.0))
    assert torch.equal(per_row.null_condition_rows(index)["emb"][:, 0], torch.tensor([-4.0, -2.0, -2.0]))
    # a key the null conditions omit is the same in both branches
    calib = ConditionedCalibration(latents_marked(), {"a": torch.arange(N), "b": torch.arange(N) * 10},
                                   {"a": torch.tensor([-1])})
    null = calib.null_condition_rows(index)
    assert null["a"].tolist() == [-1, -1, -1] and null["b"].tolist() == [30, 10, 10]


def test_cfg_false_draws_one_branch_and_needs_no_nulls(monkeypatch):
    calib = ConditionedCalibration(latents_marked(), {"class_labels": torch.arange(N)}, cfg=False)
    x_t, t, cond = stage_inputs(calib, 0, 1, 6, cfg=True, generator=torch.Generator().manual_seed(0))
    assert x_t.shape[0] == 6 and cond["class_labels"].shape == (6,), "never duplicated"
    assert torch.equal(cond["class_labels"], which_latent(x_t))
    assert prepare_calibration(_ToyModel(), _ToyAdapter(), calib) is calib
    with pytest.raises(ValueError, match=r"no null_conditions for the CFG branch \(cfg=False\)"):
        calib.null_condition_rows(torch.tensor([0]))
    # pruned end to end: no null class in the draws, and the mosaic's meta says so
    import mosaicdiff.method.pruning as prune_mod

    seen, real = [], prune_mod.collect_hessians

    def spy(model, x_t, t, condition, **kw):
        seen.append(condition["class_labels"])
        return real(model, x_t, t, condition, **kw)

    monkeypatch.setattr(prune_mod, "collect_hessians", spy)
    calib = ConditionedCalibration(torch.randn(N, 4, 8, 8), {"class_labels": torch.arange(N)}, cfg=False)
    mosaic = prune(tiny_dit(), calib, 0.3, method="uniform", samples_per_stage=4, align=None, progress=False)
    assert [s.shape for s in seen] == [(4,)] and not bool((seen[0] == 10).any())
    assert mosaic.meta["cfg"] is False


# ----------------------------------------------------------------------------- errors, one line each


@pytest.mark.parametrize("make, error, fragment", [
    (lambda x: ConditionedCalibration(x, torch.arange(N)), TypeError,
     r"^ConditionedCalibration.conditions must be a dict of the model's forward keyword arguments, got Tensor$"),
    (lambda x: ConditionedCalibration(x, {"a": {0: torch.arange(N)}}), TypeError,
     r"^ConditionedCalibration.conditions\['a'\] keys must be the forward's argument names \(str\), got 0$"),
    (lambda x: ConditionedCalibration(x, {"a": torch.arange(N)}, torch.tensor([0])), TypeError,
     r"^ConditionedCalibration.null_conditions must be a dict like conditions"),
    (lambda x: ConditionedCalibration(x, {"a": torch.randn(N, 3)}, {"a": torch.randn(3, 3)}), ValueError,
     r"^ConditionedCalibration.null_conditions\['a'\] must be a tensor of 1 row \(broadcast\) or 4 rows \(one per "
     r"latent\) shaped like the rows \(3,\) of ConditionedCalibration.conditions\['a'\], got \(3, 3\)$"),
    (lambda x: ConditionedCalibration(x, {"a": torch.randn(N, 3)}, {"a": torch.randn(1, 2)}), ValueError,
     r"shaped like the rows \(3,\) .* got \(1, 2\)$"),
    (lambda x: ConditionedCalibration(x, {"e": {"t": torch.randn(N, 3)}}, {"e": {"t": torch.randn(2, 3)}}),
     ValueError, r"^ConditionedCalibration.null_conditions\['e'\]\['t'\] must be a tensor of 1 row"),
    (lambda x: ConditionedCalibration(x, {"a": torch.arange(N)}, {"b": torch.tensor([0])}), ValueError,
     r"^ConditionedCalibration.null_conditions\['b'\] has no counterpart in ConditionedCalibration.conditions "
     r"\(keys \['a'\]\)$"),
    (lambda x: ConditionedCalibration(x, {"ids": torch.randn(5, 3)}, {"ids": torch.randn(5, 3)}), ValueError,
     r"conditions\['ids'\] is passed unchanged to every forward \(not one row per latent\), so both CFG branches "
     r"share it; leave it out of ConditionedCalibration.null_conditions$"),
    (lambda x: ConditionedCalibration(x, {"a": torch.arange(N)}, {"a": torch.tensor([0.5])}), TypeError,
     r"null_conditions\['a'\] is torch.float32 but ConditionedCalibration.conditions\['a'\] is torch.int64$"),
    (lambda x: ConditionedCalibration(x, {"a": torch.arange(N)}, {"a": torch.tensor([0])}, cfg=False), ValueError,
     r"null_conditions given with cfg=False"),
    (lambda x: ConditionedCalibration(x, {}, cfg="yes"), TypeError, r"cfg must be True or False, got 'yes'$"),
    (lambda x: ConditionedCalibration(x[0], {}), ValueError,
     r"^ConditionedCalibration.latents must be a non-empty \(N, C, H, W\) tensor, got \(4, 8, 8\)$"),
    (lambda x: ConditionedCalibration(x[:0], {}), ValueError, r"non-empty \(N, C, H, W\) tensor, got \(0, 4, 8, 8\)"),
    (lambda x: ConditionedCalibration(x.long(), {}), TypeError, r"latents must be floating point, got torch.int64$"),
    (lambda x: ConditionedCalibration(torch.where(torch.arange(N).view(N, 1, 1, 1) == 2, float("nan"), x), {}),
     ValueError, r"^calibration latents contain NaN/inf at index \[2\] \(1 of 4 samples\); drop or fix"),
])
def test_bad_calibrations_are_refused_in_one_line(make, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        make(torch.randn(N, 4, 8, 8))
    one_line(info)


def test_missing_null_conditions_with_cfg():
    calib = ConditionedCalibration(latents_marked(), {"emb": torch.randn(N, 6)})
    with pytest.raises(ValueError, match=r"^stage_inputs: cfg=True but this ConditionedCalibration has no "
                                         r"null_conditions; pass them .* or cfg=False$") as info:
        stage_inputs(calib, 0, 10, 2)
    one_line(info)
    assert stage_inputs(calib, 0, 10, 2, cfg=False)[0].shape[0] == 2
    with pytest.raises(ValueError, match=r"^ConditionedCalibration has no null_conditions for the "
                                         r"classifier-free-guidance branch and the toy adapter has no default; "
                                         r"pass null_conditions .*, or cfg=False") as info:
        prepare_calibration(_ToyModel(), _ToyAdapter(), calib)
    one_line(info)
    assert prepare_calibration(_ToyModel(), _ToyAdapter(), calib, cfg=False) is calib


def test_conditions_replaced_rows_are_checked_again():
    calib = ConditionedCalibration(torch.randn(N, 4, 8, 8), {"class_labels": torch.arange(N)})
    calib.latents = torch.randn(N + 1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"conditions\['class_labels'\] has 4 rows but there are 5 latents"):
        calib.check()


def test_the_dit_adapter_checks_its_keys_before_long_work(monkeypatch):
    import mosaicdiff.method.pruning as prune_mod

    def boom(*a, **k):
        raise AssertionError("long work started before the bad input was reported")

    monkeypatch.setattr(prune_mod, "stage_inputs", boom)
    dit, x = tiny_dit(), torch.randn(N, 4, 8, 8)
    cases = [
        (ConditionedCalibration(x, {"labels": torch.arange(N)}), TypeError,
         r"^a DiT is calibrated with Calibration\(x0, labels, null_class\) or a ConditionedCalibration with "
         r"conditions=\{'class_labels': labels\}; got conditions with keys \['labels'\]$"),
        (ConditionedCalibration(x, {"class_labels": torch.arange(3)}), ValueError,  # 3 rows: not split
         r"^ConditionedCalibration.conditions\['class_labels'\] must be one class id per latent, shape \(4,\), "
         r"got \(3,\)$"),
        (ConditionedCalibration(x, {"class_labels": torch.tensor([0, 1, 2, 11])}), ValueError,
         r"conditions\['class_labels'\] must be class ids in \[0, 10\) or the null class 10 "
         r"\(config.num_embeds_ada_norm\), got 11 at index 3$"),
        (ConditionedCalibration(x, {"class_labels": torch.arange(N)}, {"class_labels": torch.tensor([1000])}),
         ValueError, r"null_conditions\['class_labels'\] must be class ids in \[0, 10\) .* got 1000 at index 0$"),
        (ConditionedCalibration(torch.randn(N, 3, 8, 8), {"class_labels": torch.arange(N)}), ValueError,
         r"calibration samples are \(C, H, W\) = \(3, 8, 8\) but the model expects \(4, 8, 8\)"),
        (TextCalibration(torch.randn(N, 4, 8, 8), torch.randn(N, 7, TEXT)), TypeError,
         r"a DiT is calibrated with .* got conditions with keys \['encoder_hidden_states'\]$"),
    ]
    for calib, error, fragment in cases:
        with pytest.raises(error, match=fragment) as info:
            prune_stages(dit, calib, 0.3, boundaries=(200, 600), samples_per_stage=2, progress=False)
        one_line(info)


def test_the_unet_adapter_checks_its_keys():
    unet = tiny_unet()
    x = torch.randn(N, 4, 16, 16)
    with pytest.raises(TypeError, match=r"a U-Net is calibrated with TextCalibration\(latents, prompt_embeds, "
                                        r"\.\.\.\) or a ConditionedCalibration .* got conditions with keys "
                                        r"\['class_labels'\]$") as info:
        UNET.check_calibration(unet, Calibration(x, torch.arange(N), null_class=10))
    one_line(info)
    added = {"text_embeds": torch.randn(N, 32), "time_ids": TIME_IDS}  # one row of time ids: not split
    with pytest.raises(ValueError, match=r"conditions\['added_cond_kwargs'\]\['time_ids'\] must be \(4, 6\): one "
                                         r"row per latent \(expand a single row to all\), got \(1, 6\)$"):
        UNET.check_calibration(unet, ConditionedCalibration(x, {"encoder_hidden_states": torch.randn(N, 7, TEXT),
                                                                "added_cond_kwargs": added}))
    with pytest.raises(ValueError, match=r"TextCalibration needs pooled_prompt_embeds and add_time_ids"):
        UNET.check_calibration(unet, ConditionedCalibration(x, {"encoder_hidden_states": torch.randn(N, 7, TEXT)}))


# ----------------------------------------------------------------------------- same stages either way


def assert_same_stages(a, b, atol=1e-5):
    assert [(s.name, s.t_start, s.t_end, s.sparsity) for s in a] == [(s.name, s.t_start, s.t_end, s.sparsity)
                                                                      for s in b]
    for sa, sb in zip(a, b):
        for i, (x, y) in enumerate(zip(sa.blocks, sb.blocks)):
            for field in dataclasses.fields(x):
                u, v = getattr(x, field.name), getattr(y, field.name)
                if field.name.startswith("kept"):
                    assert torch.equal(u, v), f"stage {sa.name} block {i}: {field.name} differ"
                else:
                    assert_close(u, v, atol=atol, rtol=1e-5,
                                 msg=lambda m, f=field.name: f"stage {sa.name} block {i} {f}\n{m}")


def max_difference(a, b) -> float:
    """inf when any kept set differs, else the largest weight difference."""
    worst = 0.0
    for sa, sb in zip(a, b):
        for x, y in zip(sa.blocks, sb.blocks):
            for field in dataclasses.fields(x):
                u, v = getattr(x, field.name), getattr(y, field.name)
                if u.shape != v.shape or (field.name.startswith("kept") and not torch.equal(u, v)):
                    return float("inf")
                worst = max(worst, float((u.double() - v.double()).abs().max()))
    return worst


DIT_KW = dict(boundaries=(200, 600), samples_per_stage=6, batch_size=4, align=None, seed=1, progress=False)


def test_calibration_and_the_equivalent_conditioned_calibration_prune_a_dit_alike():
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.randn(8, 4, 8, 8, generator=g), torch.arange(8) % 10
    reference = prune_stages(dit, Calibration(x0, labels, null_class=10), 0.4, **DIT_KW)
    by_hand = ConditionedCalibration(x0, {"class_labels": labels}, {"class_labels": torch.tensor([10])})
    assert_same_stages(prune_stages(dit, by_hand, 0.4, **DIT_KW), reference)
    # no null conditions: the DiT adapter's default, the null class
    default = ConditionedCalibration(x0, {"class_labels": labels})
    assert DIT.default_null_conditions(dit, default)["class_labels"].tolist() == [10]
    assert_same_stages(prune_stages(dit, default, 0.4, **DIT_KW), reference)
    # the comparison is sharp: another null class changes the stages far beyond the tolerance
    other = ConditionedCalibration(x0, {"class_labels": labels}, {"class_labels": torch.tensor([3])})
    assert max_difference(prune_stages(dit, other, 0.4, **DIT_KW), reference) > 1e-3


UNET_KW = dict(method="uniform", samples_per_stage=4, batch_size=8, align=None, seed=2, progress=False,
               share_producers=False)


def test_text_calibration_and_the_equivalent_conditioned_calibration_prune_a_unet_alike():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    latents, text, pooled = (torch.randn(N, 4, 16, 16, generator=g), torch.randn(N, 7, TEXT, generator=g),
                             torch.randn(N, 32, generator=g))
    neg = torch.randn(1, 7, TEXT, generator=g)
    reference = prune_stages(unet, TextCalibration(latents, text, pooled, TIME_IDS, neg), 0.3, **UNET_KW)
    conditions = {"encoder_hidden_states": text,
                  "added_cond_kwargs": {"text_embeds": pooled, "time_ids": TIME_IDS.expand(N, 6)}}
    by_hand = ConditionedCalibration(latents, conditions, {"encoder_hidden_states": neg,
                                                           "added_cond_kwargs": {"text_embeds": torch.zeros(1, 32)}})
    assert_same_stages(prune_stages(unet, by_hand, 0.3, **UNET_KW), reference)
    # without negatives: zeros, in TextCalibration and as the U-Net adapter's default
    zeros = prune_stages(unet, TextCalibration(latents, text, pooled, TIME_IDS), 0.3, **UNET_KW)
    default = ConditionedCalibration(latents, conditions)
    assert_same_stages(prune_stages(unet, default, 0.3, **UNET_KW), zeros)
    assert max_difference(zeros, reference) > 1e-4, "the negative prompt must change the statistics"


def test_public_names():
    assert mosaicdiff.ConditionedCalibration is ConditionedCalibration
    assert issubclass(mosaicdiff.Calibration, ConditionedCalibration)
    assert issubclass(mosaicdiff.TextCalibration, ConditionedCalibration)
    calib = Calibration(torch.randn(2, 4, 8, 8), [1, 2], null_class=10)
    assert calib.conditions["class_labels"] is calib.labels and calib.null_conditions["class_labels"].tolist() == [10]
    assert calib.x0 is calib.latents and len(calib) == 2 and calib.device == torch.device("cpu")

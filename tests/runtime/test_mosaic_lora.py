"""LoRA on a mosaic (`mosaicdiff.core.lora`): diffusers' adapter API, each stage adapting its kept
rows and columns.

Oracles: at sparsity 0 the dense diffusers model with the same LoRA injected by PEFT (what
diffusers' ``load_lora_adapter`` runs); at nonzero sparsity each stage's compact weights built here
by indexing the LoRA-fused dense weights with the kept indices the mosaic's config lists (producer
rows taken from the fused weight, consumer columns of the delta added to the compensated weight).
Tolerances: fp32 on CPU, O(1) outputs; 5e-5 absolute as the conformance suite.
"""

from __future__ import annotations

import copy

import mosaicdiff
import pytest
import torch
from mosaicdiff.families.dit import testing as dit_testing
from torch.testing import assert_close

from tests.families.conformance import stage_times, three_stage_mosaic

ATOL, RTOL = 5e-5, 1e-5
RANK = 4
#: The DiT block linears a LoRA adapts, producer (rows) or consumer (columns).
PRODUCERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj")
CONSUMERS = ("attn1.to_out.0", "ff.net.2")


def random_lora(dense, modules, seed: int, rank: int = RANK, std: float = 0.2) -> dict[str, torch.Tensor]:
    """A PEFT state dict with random A and B for `modules` of `dense`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        w = dense.get_submodule(name).weight
        out[f"{name}.lora_A.weight"] = std * torch.randn(rank, w.shape[1], generator=g)
        out[f"{name}.lora_B.weight"] = std * torch.randn(w.shape[0], rank, generator=g)
    return out


def block_modules(dense, names=PRODUCERS + CONSUMERS) -> list[str]:
    return [f"transformer_blocks.{j}.{n}" for j in range(len(dense.transformer_blocks)) for n in names]


def peft_dense(dense, state_dict, alpha: float | None = None):
    """A copy of `dense` with the LoRA injected by PEFT, as diffusers' ``load_lora_adapter`` does."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = copy.deepcopy(dense)
    targets = sorted({k.split(".lora_")[0] for k in state_dict})
    config = LoraConfig(r=RANK, lora_alpha=RANK if alpha is None else alpha, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name="default")
    result = set_peft_model_state_dict(model, state_dict, adapter_name="default")
    assert not getattr(result, "unexpected_keys", None)
    return model.eval()


def fused_delta(state_dict, module: str, scale: float = 1.0) -> torch.Tensor:
    return scale * state_dict[f"{module}.lora_B.weight"] @ state_dict[f"{module}.lora_A.weight"]


@pytest.fixture
def kit():
    dense = dit_testing.tiny_dense()
    x, cond = dit_testing.tiny_inputs(dense, 3)
    return dense, x, cond


def outputs(model, x, cond, times):
    return [dit_testing.call(model, x, torch.full((x.shape[0],), t), cond) for t in times]


# ---------------------------------------------------------------- sparsity 0: the dense model + PEFT


@pytest.mark.parametrize("alpha", [None, 2.0 * RANK], ids=["no-alpha", "alpha-2r"])
def test_zero_sparsity_mosaic_with_lora_equals_dense_with_peft_lora(kit, alpha):
    dense, x, cond = kit
    modules = block_modules(dense) + ["transformer_blocks.1.norm1.linear", "proj_out_1", "proj_out_2"]
    lora = random_lora(dense, modules, seed=3)
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    metadata = None if alpha is None else {"r": RANK, "lora_alpha": alpha}
    mosaic.load_lora_adapter(lora, adapter_name="style", metadata=metadata)
    reference = peft_dense(dense, lora, alpha)
    times = (0, 500, 999)
    for got, want, base in zip(outputs(mosaic, x, cond, times), outputs(reference, x, cond, times),
                               outputs(dense, x, cond, times)):
        assert (want - base).abs().max() > 1e-2, "the LoRA must change the output"
        assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_a_pipeline_prefixed_file_loads(kit, tmp_path):
    """A ``transformer.``-prefixed safetensors file (what ``save_lora_weights`` writes) loads from a folder."""
    from safetensors.torch import save_file

    dense, x, cond = kit
    lora = random_lora(dense, block_modules(dense), seed=4)
    save_file({f"transformer.{k}": v for k, v in lora.items()}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    mosaic.load_lora_adapter(tmp_path)
    assert mosaic.active_adapters() == ["default_0"]
    assert_close(outputs(mosaic, x, cond, [500])[0], outputs(peft_dense(dense, lora), x, cond, [500])[0],
                 atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- nonzero sparsity: each stage's kept units


def oracle_stage_weights(dense, lora, base, kept, scale: float = 1.0):
    """Each stage's compact weights (``CompactBlockWeights`` fields, ``[q | k | v]``) with the LoRA:
    producer rows of the fused dense weights at the kept units, consumer columns of the delta added
    to the mosaic's compensated weights (`base`, read before loading)."""
    hd = int(dense.config.attention_head_dim)
    out = []
    for i, stage in enumerate(kept):
        blocks = []
        for j, units in enumerate(stage):
            heads, channels = torch.tensor(units["kept_heads"]), torch.tensor(units["kept_channels"])
            rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
            p = f"transformer_blocks.{j}."

            def fused(name, prefix=p):
                return dense.get_submodule(prefix + name).weight.detach() + fused_delta(lora, prefix + name, scale)

            blocks.append({
                "qkv_weight": torch.cat([fused(n)[rows] for n in PRODUCERS[:3]]),
                "fc1_weight": fused("ff.net.0.proj")[channels],
                "proj_weight": base[i][j].proj_weight + fused_delta(lora, p + "attn1.to_out.0", scale)[:, rows],
                "fc2_weight": base[i][j].fc2_weight + fused_delta(lora, p + "ff.net.2", scale)[:, channels],
            })
        out.append(blocks)
    return out


def stage_weights(mosaic):
    return [[copy.deepcopy(b.weights()) for b in stage] for stage in mosaic.stage_blocks]


def sliding_stage_mosaic(dense, share: bool):
    """Three stages: the first keeps every unit, the other two as many units as each other but
    different ones (heads {0,1} and {1,2}, channels [0, 64) and [32, 96): runs of one order, so they
    share a storage too). A stage adapted at another stage's kept set lands on the wrong units
    without any shape error."""
    from mosaicdiff.core.stages import StageSpec
    from mosaicdiff.families.dit.adapter import DIT
    from mosaicdiff.method.compact import prune_groups

    stages = []
    for i, (t0, t1) in enumerate(((0, 300), (300, 700), (700, 1000))):
        s = i - 1  # the window's start: heads s, s + 1; channels 32 s .. 32 s + 64
        keep = None if i == 0 else {"heads": torch.arange(s, s + 2), "channels": torch.arange(32 * s, 32 * s + 64)}
        blocks = []
        for block in dense.transformer_blocks:
            groups = DIT.groups(block)
            within = None if keep is None else {name: keep[g.kind] for name, g in groups.items()}
            pruned = prune_groups(groups, None, 0.0 if keep is None else 0.5, method="magnitude", align=None,
                                  keep_within=within)
            blocks.append(DIT.compact_block(block, pruned))
        stages.append(StageSpec(f"s{i}", t0, t1, 0.0 if keep is None else 0.5, blocks))
    return mosaicdiff.families.family_for(dense).mosaic_class.from_dense(dense, stages, share_producers=share)


@pytest.mark.parametrize("share", [True, False], ids=["shared-producers", "copies"])
@pytest.mark.parametrize("build", ["sliding", "nested"])
def test_each_stage_adapts_its_own_kept_rows_and_columns(kit, share, build):
    """Fails when a stage's rows or columns are taken at another stage's kept set: the sliding
    stages keep as many units as each other but different ones (checked); every stage is compared."""
    dense, x, cond = kit
    mosaic = (sliding_stage_mosaic(dense, share) if build == "sliding" else
              three_stage_mosaic(mosaicdiff.families.family_for(dense), dense, share_producers=share))
    assert (mosaic.producer_storage is not None) == share
    kept = [s["blocks"] for s in mosaic.config.stages]
    if build == "sliding":
        assert sorted(kept[1][0]["kept_heads"]) != sorted(kept[2][0]["kept_heads"])
        assert sorted(kept[1][1]["kept_channels"]) != sorted(kept[2][1]["kept_channels"])
        assert len(kept[1][1]["kept_channels"]) == len(kept[2][1]["kept_channels"])
    base = stage_weights(mosaic)
    lora = random_lora(dense, block_modules(dense), seed=5)
    mosaic.load_lora_adapter(lora, adapter_name="a")
    want = oracle_stage_weights(dense, lora, base, kept)
    for i, stage in enumerate(mosaic.stage_blocks):
        for j, block in enumerate(stage):
            got = block.weights()
            for name, expected in want[i][j].items():
                assert_close(getattr(got, name), expected, atol=1e-5, rtol=1e-5, msg=f"stage {i} block {j} {name}")
    for got, before in zip(outputs(mosaic, x, cond, stage_times(mosaic)),
                           outputs(sliding_stage_mosaic(dense, share) if build == "sliding" else
                                   three_stage_mosaic(mosaicdiff.families.family_for(dense), dense, share),
                                   x, cond, stage_times(mosaic))):
        assert (got - before).abs().max() > 1e-2


def test_shared_producers_and_copies_give_the_same_outputs_with_lora(kit):
    dense, x, cond = kit
    family = mosaicdiff.families.family_for(dense)
    shared, copies = (three_stage_mosaic(family, dense, share_producers=s) for s in (True, False))
    lora = random_lora(dense, block_modules(dense), seed=6)
    plain = outputs(shared, x, cond, stage_times(shared))
    for m in (shared, copies):
        m.load_lora_adapter(lora)
    for got, want, before in zip(outputs(shared, x, cond, stage_times(shared)),
                                 outputs(copies, x, cond, stage_times(shared)), plain):
        assert (got - before).abs().max() > 1e-2
        assert_close(got, want, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- fuse, unfuse, weights, unload


@pytest.fixture
def loaded(kit):
    """A three-stage mosaic, its outputs per stage before any adapter, and two LoRAs."""
    dense, x, cond = kit
    mosaic = three_stage_mosaic(mosaicdiff.families.family_for(dense), dense, share_producers=True)
    loras = [random_lora(dense, block_modules(dense), seed=s) for s in (7, 8)]
    return mosaic, outputs(mosaic, x, cond, stage_times(mosaic)), loras


def with_oracle(kit, loaded, adapters):
    """Load `adapters` (name -> LoRA) into the mosaic; returns a function giving the oracle's stage
    weights of a LoRA at a scale (`oracle_stage_weights` on the weights read before loading)."""
    mosaic = loaded[0]
    base, kept = stage_weights(mosaic), [s["blocks"] for s in mosaic.config.stages]
    for name, lora in adapters.items():
        mosaic.load_lora_adapter(lora, adapter_name=name)
    return lambda lora, scale=1.0: oracle_stage_weights(kit[0], lora, base, kept, scale)


def test_fuse_unfuse_round_trip(kit, loaded):
    _, x, cond = kit
    mosaic, plain, (lora, _) = loaded
    oracle = with_oracle(kit, loaded, {"a": lora})
    unfused = outputs(mosaic, x, cond, stage_times(mosaic))
    mosaic.fuse_lora(lora_scale=0.5)
    half = oracle(lora, 0.5)
    assert_close(mosaic.stage_blocks[2][1].weights().fc2_weight, half[2][1]["fc2_weight"], atol=1e-5, rtol=1e-5)
    assert_close(mosaic.stage_blocks[1][0].weights().qkv_weight, half[1][0]["qkv_weight"], atol=1e-5, rtol=1e-5)
    mosaic.unfuse_lora()
    for got, want in zip(outputs(mosaic, x, cond, stage_times(mosaic)), unfused):
        assert_close(got, want, atol=ATOL, rtol=RTOL)
    mosaic.unload_lora()
    assert mosaic.peft_config == {}
    for got, want in zip(outputs(mosaic, x, cond, stage_times(mosaic)), plain):
        assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_set_adapters_weights_disable_and_delete(kit, loaded):
    _, x, cond = kit
    mosaic, plain, (la, lb) = loaded
    oracle = with_oracle(kit, loaded, {"a": la, "b": lb})
    mosaic.set_adapters(["a", "b"], [0.5, -1.0])
    # the oracle of a weighted sum: a LoRA of rank 2r whose B stacks 0.5 B_a and -B_b
    both = {k: torch.cat([la[k], lb[k]]) if "lora_A" in k else torch.cat([0.5 * la[k], -lb[k]], dim=1) for k in la}
    want = oracle(both)
    for i in range(3):
        assert_close(mosaic.stage_blocks[i][1].weights().proj_weight, want[i][1]["proj_weight"], atol=1e-5, rtol=1e-5)
        assert_close(mosaic.stage_blocks[i][0].weights().fc1_weight, want[i][0]["fc1_weight"], atol=1e-5, rtol=1e-5)
    assert mosaic.active_adapters() == ["a", "b"] and sorted(mosaic.peft_config) == ["a", "b"]
    mosaic.disable_lora()
    assert_close(outputs(mosaic, x, cond, stage_times(mosaic))[0], plain[0], atol=ATOL, rtol=RTOL)
    mosaic.enable_lora()
    mosaic.delete_adapters("b")
    mosaic.set_adapters("a", 0.5)
    only_a = oracle(la, 0.5)
    assert_close(mosaic.stage_blocks[0][0].weights().qkv_weight, only_a[0][0]["qkv_weight"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fused; call unfuse_lora"):
        mosaic.fuse_lora()
        mosaic.set_adapters("a", 1.0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {**sd, "transformer_blocks.0.attn1.to_x.lora_A.weight": torch.zeros(RANK, 32),
                 "transformer_blocks.0.attn1.to_x.lora_B.weight": torch.zeros(32, RANK)},
     "'transformer_blocks.0.attn1.to_x' names no module the mosaic can adapt"),
    (lambda sd: {**sd, "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, RANK - 1)},
     "'transformer_blocks.0.attn1.to_q' has rank mismatch"),
    (lambda sd: {**sd, "transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 31)},
     (r"'transformer_blocks.0.attn1.to_q' has shape mismatch: lora_B @ lora_A is \(32, 31\), the dense weight is "
      r"\(32, 32\)")),
    (lambda sd: {k: v for k, v in sd.items() if k != "transformer_blocks.0.ff.net.2.lora_B.weight"},
     "'transformer_blocks.0.ff.net.2' has lora_A but not lora_B"),
    (lambda sd: {**sd, "transformer_blocks.0.ff.net.2.lora_B.bias": torch.zeros(32)}, "is a LoRA bias"),
    (lambda sd: {**sd, "transformer_blocks.0.ff.net.2.lora_down.weight": torch.zeros(RANK, 32)}, "a non-PEFT key"),
])
def test_bad_adapters_are_refused_and_change_nothing(kit, loaded, edit, message):
    _, x, cond = kit
    mosaic, plain, (lora, _) = loaded
    with pytest.raises(ValueError, match=message):
        mosaic.load_lora_adapter(edit(lora))
    assert mosaic.peft_config == {}
    assert_close(outputs(mosaic, x, cond, stage_times(mosaic))[2], plain[2], atol=1e-6, rtol=1e-6)


def test_adapter_names_are_checked(loaded):
    mosaic, _, (lora, other) = loaded
    mosaic.load_lora_adapter(lora, adapter_name="a")
    with pytest.raises(ValueError, match="adapter_name 'a' is already in use"):
        mosaic.load_lora_adapter(other, adapter_name="a")
    with pytest.raises(ValueError, match=r"set_adapters: adapter\(s\) \['z'\] are not loaded; loaded: \['a'\]"):
        mosaic.set_adapters(["a", "z"])
    with pytest.raises(ValueError, match="2 adapter names and 1 weights"):
        mosaic.load_lora_adapter(other, adapter_name="b")
        mosaic.set_adapters(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="'c' is not loaded"):
        mosaic.load_lora_adapter(other, adapter_name="c", hotswap=True)


# ---------------------------------------------------------------- every family through the same core code

#: Per family, its groups' kept-unit lists in a mosaic's stage config.
KEPT_KEYS = {"dit": {"proj": "kept_heads", "fc2": "kept_channels"},
             "unet": {"attn1": "kept_heads1", "attn2": "kept_heads2", "ff": "kept_channels"},
             "pixart": {"attn1": "kept_heads1", "attn2": "kept_heads2", "ff": "kept_channels"},
             "sd3": {"attn": "kept_heads", "attn2": "kept_heads2", "ff": "kept_channels",
                     "ff_context": "kept_context_channels"},
             "flux": {"attn": "kept_heads", "mlp": "kept_channels", "ff": "kept_channels",
                      "ff_context": "kept_context_channels"}}


def family_named(name):
    return next(f for f in mosaicdiff.families.FAMILIES if f.name == name)


def group_linears(family, dense) -> list[str]:
    """The dense names of every producer and consumer the family's adapter prunes."""
    names = {id(m): n for n, m in dense.named_modules()}
    out = []
    for block in family.adapter.blocks(dense):
        for g in family.adapter.groups(block).values():
            out += [names[id(m)] for m in (*g.producers, *g.consumers)]
    return sorted(set(out))


def pruned_fused_oracle(family, dense, lora, mosaic):
    """The LoRA-fused dense model pruned at the mosaic's kept sets (magnitude: nothing compensated,
    so each stage is the fused weights' kept rows and columns), by the family's own adapter, as copies."""
    from mosaicdiff.core.stages import StageSpec
    from mosaicdiff.method.compact import prune_groups

    fused = copy.deepcopy(dense)
    with torch.no_grad():
        for key in lora:
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                fused.get_submodule(module).weight += fused_delta(lora, module)
    stages = []
    for spec in mosaic.config.stages:
        blocks = []
        for block, kept in zip(family.adapter.blocks(fused), spec["blocks"]):
            groups = family.adapter.groups(block)
            keep = {name: torch.tensor(kept[KEPT_KEYS[family.name][name]]) for name in groups}
            sparsity = {name: 1 - len(keep[name]) / g.num_units for name, g in groups.items()}
            pruned = prune_groups(groups, None, sparsity, method="magnitude", align=None, keep_within=keep)
            assert all(torch.equal(pruned[n].kept.sort().values, keep[n].sort().values) for n in groups)
            blocks.append(family.adapter.compact_block(block, pruned))
        stages.append(StageSpec(spec["name"], spec["t_start"], spec["t_end"], spec["sparsity"], blocks))
    return family.mosaic_class.from_dense(fused, stages, share_producers=False)


@pytest.mark.parametrize("name", sorted(KEPT_KEYS))
def test_every_family_at_sparsity_zero_equals_its_dense_model_with_peft_lora(name):
    family = family_named(name)
    testing = family.testing_module()
    dense = testing.tiny_dense()
    x, cond = testing.tiny_inputs(dense, 2)
    mosaic = mosaicdiff.prune(dense, None, 0.0, method="magnitude", align=None, progress=False)
    targets = mosaic._lora_targets()
    skeleton = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" not in n]
    modules = group_linears(family, dense) + [n for n in skeleton if n in targets][:3]
    assert set(modules) <= set(targets)
    lora = random_lora(dense, modules, seed=9)
    mosaic.load_lora_adapter(lora)
    reference = peft_dense(dense, lora)
    for t in (0, 999):
        tt = torch.full((2,), t)
        want = testing.call(reference, x, tt, cond)
        assert (want - testing.call(dense, x, tt, cond)).abs().max() > 1e-2
        assert_close(testing.call(mosaic, x, tt, cond), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("share", [True, False], ids=["shared-producers", "copies"])
@pytest.mark.parametrize("name", sorted(KEPT_KEYS))
def test_every_family_pruned_equals_its_pruned_fused_dense_model(name, share):
    family = family_named(name)
    testing = family.testing_module()
    dense = testing.tiny_dense()
    x, cond = testing.tiny_inputs(dense, 2)
    mosaic = three_stage_mosaic(family, dense, share_producers=share)
    assert (mosaic.producer_storage is not None) == share
    lora = random_lora(dense, group_linears(family, dense), seed=10)
    oracle = pruned_fused_oracle(family, dense, lora, mosaic)
    mosaic.load_lora_adapter(lora)
    for t in stage_times(mosaic):
        tt = torch.full((2,), t)
        assert_close(testing.call(mosaic, x, tt, cond), testing.call(oracle, x, tt, cond), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_pipeline_loads_fuses_weights_and_unloads_through_the_mosaic(name):
    """diffusers' ``pipe.load_lora_weights`` / ``fuse_lora`` / ``set_adapters`` / ``unload_lora_weights``
    reach the mosaic (the pipeline calls its ``load_lora_adapter``, ``fuse_lora``, ...)."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin

    family = family_named(name)
    dense = family.testing_module().tiny_dense()
    mosaic = three_stage_mosaic(family, dense, share_producers=True)
    direct = copy.deepcopy(mosaic)
    base = {k: v.clone() for k, v in mosaic.state_dict().items()}

    class Pipe(DiffusionPipeline, {"sd3": SD3LoraLoaderMixin, "flux": FluxLoraLoaderMixin}[name]):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer, text_encoder=None, text_encoder_2=None)

    pipe = Pipe(mosaic)
    lora = random_lora(dense, group_linears(family, dense), seed=11)
    pipe.load_lora_weights({f"transformer.{k}": v for k, v in lora.items()}, adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    direct.load_lora_adapter(lora, adapter_name="x")
    direct.set_adapters("x", 0.7)
    for key, value in direct.state_dict().items():
        assert_close(mosaic.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    assert (mosaic.state_dict()["stage_blocks.1.0.out_weight"] - base["stage_blocks.1.0.out_weight"]).abs().max() > 1e-3
    pipe.fuse_lora(lora_scale=0.5)  # 0.5 x 0.7
    direct.fuse_lora(lora_scale=0.35 / 0.7)
    for key, value in direct.state_dict().items():
        assert_close(mosaic.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    pipe.unload_lora_weights()
    assert mosaic.peft_config == {}
    for key, value in base.items():
        assert_close(mosaic.state_dict()[key], value, atol=1e-6, rtol=1e-6)


def test_a_layerwise_cast_mosaic_refuses_an_adapter_and_keeps_its_weights(loaded):
    mosaic, _, (lora, _) = loaded
    mosaic.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    before = {k: v.float().clone() for k, v in mosaic.state_dict().items() if v.is_floating_point()}
    with pytest.raises(TypeError, match="cannot add an adapter to torch.float8_e4m3fn weights"):
        mosaic.load_lora_adapter(lora, adapter_name="a")
    assert mosaic.peft_config == {} and mosaic.active_adapters() == []
    for key, value in before.items():
        assert_close(mosaic.state_dict()[key].float(), value, atol=1e-6, rtol=1e-6, msg=key)

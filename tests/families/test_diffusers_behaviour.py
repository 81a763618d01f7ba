"""What diffusers' own model tests ask of a ``ModelMixin``, asked of every registered family's mosaic.

diffusers checks its models with ``ModelTesterMixin`` and ``LayerwiseCastingTesterMixin``
(``tests/models/testing_utils``; older releases: ``tests/models/test_modeling_common.py``). A
mosaic is a diffusers model (pipelines load and call it as one), so it must pass the same checks.
These tests are written for the mosaics, not copied; each names the diffusers tests it stands for.
They run over `mosaicdiff.families.FAMILIES` with a three-stage, shared-producer mosaic of the
family's tiny dense model (``tests/families/conformance.py``), built from its config the way
diffusers' tests build a model (``MosaicX(**config)`` under a seed), and a batch with one row per
stage, so every stage's blocks are in every forward.

diffusers test (CPU-runnable)                           here
------------------------------------------------------  ------------------------------------------------
(every test builds ``model_class(**init_dict)``)        test_built_from_its_config_has_initialised_weights
                                                        test_from_config_round_trip
test_from_save_pretrained                               test_from_save_pretrained
test_from_save_pretrained_variant                       test_from_save_pretrained_variant
test_from_save_pretrained_dtype[fp32/fp16/bf16]         test_from_save_pretrained_dtype
test_from_pretrained_dtype_alias[fp32/fp16/bf16]        test_from_save_pretrained_dtype (dtype= alias)
test_determinism                                        test_determinism
test_output                                             test_output_shape
test_outputs_equivalence                                test_outputs_equivalence
test_getattr_is_correct                                 test_getattr_is_correct
test_sharded_checkpoints (+ _with_variant,              test_sharded_checkpoints (variant parametrized)
  _with_parallel_loading)
test_layerwise_casting_memory                           test_layerwise_casting_forward_and_memory
test_layerwise_casting_training                         test_layerwise_casting_training
(``_no_split_modules``, ``_skip_layerwise_casting_       test_diffusers_model_attributes,
  patterns``, ``_repeated_blocks``; compile_repeated_    test_compile_repeated_blocks
  blocks)
(diffusers' no_init_weights when loading)               test_loading_and_converting_skip_the_init
(models run inside autocast regions)                    test_forward_under_autocast_runs_in_the_weights_dtype
test_keep_in_fp32_modules(*)                            none: the mosaics keep no module in fp32
                                                        (``_keep_in_fp32_modules`` is None; diffusers
                                                        skips these tests then)

Known, deliberate differences from diffusers' tests run verbatim: the weights file is
``model.safetensors`` (diffusers: ``diffusion_pytorch_model.safetensors``, so its tests' literal
file names and message differ), and a mosaic's weights are frozen (``requires_grad=False``), so
training, diffusers' layerwise-casting training test included, first unfreezes them
(``mosaic.requires_grad_(True)``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close

from mosaicdiff import families
from mosaicdiff.core import model_folder
import mosaicdiff.core.model
from tests.families.conformance import three_stage_mosaic

#: fp32 on CPU, outputs O(1): only summation orders may differ.
ATOL, RTOL = 5e-5, 1e-5


@pytest.fixture(autouse=True)
def _torch_backend():
    """The fast torch reference backend of the kernel ops (the kernels have their own tests)."""
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


class Kit:
    """A family's mosaic class, the init dict of a three-stage mosaic and a batch of inputs."""

    def __init__(self, family):
        self.family = family
        self.cls = family.mosaic_class
        self.testing = family.testing_module()
        with torch.random.fork_rng(devices=[]):
            dense = self.testing.tiny_dense()
            self.reference = three_stage_mosaic(family, dense, share_producers=True)
            self.x, self.cond = self.testing.tiny_inputs(dense, 3)
        self.init_dict = dict(self.reference.config)
        # one row per stage: every stage's blocks run in each forward
        self.t = torch.tensor([(t0 + t1) // 2 for _, t0, t1, _ in self.reference.stage_ranges])

    def build(self, seed: int = 0):
        """``model_class(**init_dict)`` under a seed, as diffusers' tests build a model."""
        torch.manual_seed(seed)
        return self.cls(**self.init_dict).eval()

    def inputs(self, dtype: torch.dtype = torch.float32) -> dict:
        """The forward's arguments (fresh copies), floating tensors in `dtype`."""
        def cast(v):
            if isinstance(v, torch.Tensor):
                return v.to(dtype) if v.is_floating_point() else v.clone()
            return {k: cast(u) for k, u in v.items()} if isinstance(v, dict) else v

        return {"x": self.x.to(dtype), "t": self.t.clone(), **{k: cast(v) for k, v in self.cond.items()}}

    def forward(self, model, dtype: torch.dtype = torch.float32, **kwargs):
        args = self.inputs(dtype)
        x, t = args.pop("x"), args.pop("t")
        inputs = getattr(self.testing, "model_inputs", None)  # a family whose forward takes more (Flux's ids, t / 1000)
        if inputs is not None:
            return model(**inputs(x, t, args), **kwargs)
        # the timestep by name: PixArt's second positional argument is the text states
        return model(x, timestep=t, **args, **kwargs)

    @torch.no_grad()
    def output(self, model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.forward(model, dtype, return_dict=False)[0]


@pytest.fixture(scope="module", params=[f.name for f in families.FAMILIES])
def kit(request):
    return Kit(next(f for f in families.FAMILIES if f.name == request.param))


@pytest.fixture(scope="module")
def base_output(kit):
    """The output of the model built from its config with seed 0 (diffusers' ``base_model_output``)."""
    from mosaic_kernels import ops

    with ops.use_backend("torch"):  # (set up before the function-scoped backend fixture)
        return kit.output(kit.build(0))


def _float_params(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _weights_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


# ------------------------------------------------------------------ construction from a config


def test_built_from_its_config_has_initialised_weights(kit, base_output):
    """``MosaicX(**model.config)`` gives initialised weights (torch's defaults), drawn from the
    global RNG: finite outputs, the same model for the same seed, another for another seed."""
    a, b, c = kit.build(0), kit.build(0), kit.build(1)
    pa, pb, pc = _float_params(a), _float_params(b), _float_params(c)
    assert pa.keys() == pb.keys() == pc.keys()
    for key, value in pa.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, pb[key]), f"{key}: the same seed must build the same weights"
        if value.dim() == 2:  # every matrix drawn (not zeros, not left as allocated)
            assert value.std() > 0 and not torch.equal(value, pc[key]), key
    assert torch.isfinite(base_output).all() and base_output.abs().max() > 0
    # the producer storage a shared-producer block reads is initialised too
    assert a.producer_storage is not None
    for name, p in a.producer_storage.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name


def test_from_config_round_trip(kit):
    """``from_config(model.config)`` (a saved config.json's keys included) builds the same config."""
    model = kit.build(0)
    again = kit.cls.from_config(dict(model.config))
    assert dict(again.config) == dict(model.config)
    assert again.stage_ranges == model.stage_ranges and again.num_stages == 3


def test_loading_and_converting_skip_the_init(kit, tmp_path, monkeypatch):
    """from_pretrained and from_dense assign every weight: they must not pay for an init first."""
    model = kit.build(0)
    model.save_pretrained(tmp_path / "m")

    def forbidden(model):
        raise AssertionError("weights initialised, then overwritten")

    monkeypatch.setattr(mosaicdiff.core.model, "init_weights", forbidden)
    loaded = kit.cls.from_pretrained(tmp_path / "m")
    assert_close(kit.output(loaded), kit.output(model), atol=1e-6, rtol=1e-6)
    dense = kit.testing.tiny_dense()
    three_stage_mosaic(kit.family, dense, share_producers=True)
    with pytest.raises(AssertionError, match="initialised, then overwritten"):
        kit.build(0)


# ------------------------------------------------------------------ save and load


def test_from_save_pretrained(kit, base_output, tmp_path):
    model = kit.build(0)
    model.save_pretrained(tmp_path)
    loaded = kit.cls.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].shape == value.shape, key
    assert_close(kit.output(loaded), base_output, atol=ATOL, rtol=RTOL)


def test_from_save_pretrained_variant(kit, base_output, tmp_path):
    """``variant="fp16"`` writes diffusers' variant name and only ``from_pretrained(variant=)`` reads
    it; the folder keeps its other variants while the config is unchanged."""
    model = kit.build(0)
    model.save_pretrained(tmp_path, variant="fp16")
    assert _weights_files(tmp_path) == ["model.fp16.safetensors"]
    assert_close(kit.output(kit.cls.from_pretrained(tmp_path, variant="fp16")), base_output, atol=ATOL, rtol=RTOL)
    with pytest.raises(OSError, match=r"model\.safetensors not found: .* holds variant 'fp16'"):
        kit.cls.from_pretrained(tmp_path)
    with pytest.raises(OSError, match=r"model\.bf16\.safetensors not found"):
        kit.cls.from_pretrained(tmp_path, variant="bf16")
    # the default set next to a half-precision variant: both load, each in its dtype
    model.save_pretrained(tmp_path)
    model.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert _weights_files(tmp_path) == ["model.fp16.safetensors", "model.safetensors"]
    assert_close(kit.output(kit.cls.from_pretrained(tmp_path)), base_output, atol=ATOL, rtol=RTOL)
    half = kit.cls.from_pretrained(tmp_path, variant="fp16")
    assert half.dtype == torch.float16
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "float32" and config["variants"]["fp16"]["dtype"] == "float16"
    # a save of another model (another config) replaces the folder's model: the variant goes
    kit.cls.from_config({**kit.init_dict, "meta": {"another": "model"}}).save_pretrained(tmp_path)
    assert _weights_files(tmp_path) == ["model.safetensors"]
    with pytest.raises(ValueError, match="variant must be a name"):
        model.save_pretrained(tmp_path, variant="../x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_from_save_pretrained_dtype(kit, tmp_path, dtype):
    model = kit.build(0).to(dtype)
    model.save_pretrained(tmp_path)
    assert kit.cls.from_pretrained(tmp_path, low_cpu_mem_usage=True, torch_dtype=dtype).dtype == dtype
    assert kit.cls.from_pretrained(tmp_path, low_cpu_mem_usage=False, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints(kit, base_output, tmp_path, variant):
    """``max_shard_size`` shards the weights with an index mapping each tensor to its file; every
    shard and the index carry the save's id; loading reads them as one."""
    model = kit.build(0)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(tmp_path, max_shard_size=f"{int(size * 0.75 / 1000)}KB", variant=variant)
    index_path = tmp_path / model_folder.index_name(variant)
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = int(shards[0].rsplit("-", 1)[1].split(".")[0])
    assert len(shards) == n >= 2 and _weights_files(tmp_path) == shards
    stem = "model" if variant is None else f"model.{variant}"
    assert shards == [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == size
    config = json.loads((tmp_path / "config.json").read_text())
    want = config["weights_id"] if variant is None else config["variants"][variant]["weights_id"]
    assert index["metadata"][model_folder.WEIGHTS_ID_KEY] == want
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata()[model_folder.WEIGHTS_ID_KEY] == want
            assert {index["weight_map"][k] for k in f.keys()} == {shard}
    loaded = kit.cls.from_pretrained(tmp_path, variant=variant)
    assert_close(kit.output(loaded), base_output, atol=ATOL, rtol=RTOL)
    # one file again: the shards and the index go
    model.save_pretrained(tmp_path, variant=variant)
    assert _weights_files(tmp_path) == [model_folder.weights_name(variant)]
    assert not index_path.exists()


# ------------------------------------------------------------------ the forward


def test_determinism(kit):
    model = kit.build(0)
    first, second = kit.output(model), kit.output(model)
    assert torch.isfinite(first).all()
    assert_close(first, second, atol=1e-6, rtol=1e-6)


def test_output_shape(kit, base_output):
    out_channels = kit.init_dict.get("out_channels") or kit.init_dict["in_channels"]
    assert base_output.shape == (kit.x.shape[0], out_channels, *kit.x.shape[2:])


def test_outputs_equivalence(kit):
    """``return_dict=False`` gives the tuple of the output object's values."""
    model = kit.build(0)
    with torch.no_grad():
        as_dict, as_tuple = kit.forward(model), kit.forward(model, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.values()) == 1
    assert_close(as_tuple[0], as_dict.sample, atol=1e-6, rtol=1e-6)


def test_getattr_is_correct(kit):
    model = kit.build(0)
    model.dummy_attribute = 5
    model.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for attributes and methods
        assert model.dummy_attribute == 5 and getattr(model, "save_pretrained") == model.save_pretrained
    with pytest.warns(FutureWarning):  # config attributes through the model: deprecated, as in diffusers
        assert model.test_attribute == 5
    with pytest.raises(AttributeError, match=rf"^'{kit.cls.__name__}' object has no attribute 'does_not_exist'$"):
        model.does_not_exist


# ------------------------------------------------------------------ layerwise casting, autocast, compile


def _rounded_reference(model, cast: dict[str, torch.dtype], compute: torch.dtype):
    """A copy of `model` (taken before casting) whose weights that layerwise casting stores in a
    lower dtype (`cast`: name -> storage dtype) are rounded through it, all in `compute`: what the
    cast model computes, without any casting at run time."""
    reference = type(model).from_config(dict(model.config))
    reference.load_state_dict(model.state_dict())
    reference.to(compute)
    with torch.no_grad():
        for key, p in reference.named_parameters():
            if key in cast:
                p.copy_(p.to(cast[key]).to(compute))
    return reference


def test_layerwise_casting_forward_and_memory(kit):
    """fp8 storage, bf16 compute: the compact blocks and the producer storage are stored in fp8
    (norms kept), the forward equals the model with those weights rounded through fp8, and the
    footprint shrinks (diffusers' test_layerwise_casting_memory, footprint part)."""
    storage, compute = torch.float8_e4m3fn, torch.bfloat16
    model = kit.build(0)
    full = model.get_memory_footprint()
    snapshot = kit.cls.from_config(dict(model.config))
    snapshot.load_state_dict(model.state_dict())
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    assert model.dtype == compute
    stored = dict(model.named_parameters())
    compact = {k: p for k, p in stored.items() if k.startswith(("stage_blocks.", "producer_storage."))}
    assert any(k.startswith("producer_storage.") for k in compact)
    for key, p in compact.items():
        assert p.dtype == (compute if "norm" in key else storage), key
    reference = _rounded_reference(snapshot, {k: p.dtype for k, p in stored.items() if p.dtype == storage}, compute)
    assert_close(kit.output(model, compute), kit.output(reference, compute), atol=1e-6, rtol=1e-6)
    for key, p in compact.items():  # back in storage after the forward; the views still read it
        assert p.dtype == (compute if "norm" in key else storage), key
    assert model.get_memory_footprint() < full / 2
    with pytest.raises(RuntimeError, match="already enabled"):
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_layerwise_casting_training(kit, storage):
    """diffusers' test_layerwise_casting_training: a training step under autocast with the weights
    stored in `storage` and computed in fp32. The gradients reach the compact blocks and the shared
    producer storage in fp32 and equal those of the uncast model with the same (rounded) weights;
    the backward reads the weights as the forward used them (a convolution of the skeleton saves
    its weight: diffusers' hook alone would give it the storage dtype). The weights are frozen
    until unfrozen."""
    model = kit.build(0)
    snapshot = kit.cls.from_config(dict(model.config))
    snapshot.load_state_dict(model.state_dict())
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    cast = {k: p.dtype for k, p in model.named_parameters() if p.dtype == storage}
    reference = _rounded_reference(snapshot, cast, torch.float32)
    target = torch.randn(kit.output(model).shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (model, reference):
        m.requires_grad_(True).train()
        torch.manual_seed(0)  # training-mode randomness (DiT's class-label dropout) alike in both
        with torch.autocast(device_type="cpu"):
            out = kit.forward(m, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    got, want = grads
    for prefix in ("stage_blocks.", "producer_storage.", "unet.conv_out.", "shared.proj_out_2."):
        assert any(k.startswith(prefix) and k in cast for k in got) or not any(k.startswith(prefix) for k in got)
    assert any(k.startswith("producer_storage.") for k in cast)
    for key, g in got.items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), key
        assert_close(g, want[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(got[k].abs().sum() > 0 for k in cast if k.startswith("stage_blocks."))


def test_forward_under_autocast_runs_in_the_weights_dtype(kit, base_output):
    """Inside an autocast region (a training loop's, a pipeline's) the fused ops still get one
    dtype: the mosaic's forward runs in its weights' dtype, as outside."""
    model = kit.build(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = kit.output(model)
    assert out.dtype == torch.float32
    assert_close(out, base_output, atol=ATOL, rtol=RTOL)


def test_diffusers_model_attributes(kit):
    """The attributes diffusers' device maps, layerwise casting and regional compilation read name
    modules this model has (an empty or stale list would silently do nothing)."""
    model = kit.build(0)
    classes = {type(m).__name__ for m in model.modules()}
    compact = {type(b).__name__ for blocks in model.stage_blocks for b in blocks}
    assert compact <= set(model._repeated_blocks) <= set(model._no_split_modules)
    assert set(model._no_split_modules) - classes <= {"CompactUNetBlock", "CompactDiTBlock",
                                                      "CompactPixArtBlock", "CompactSD3Block",
                                                      "CompactFluxDoubleBlock", "CompactFluxSingleBlock"}  # copy layout
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    for pattern in model._skip_layerwise_casting_patterns:
        assert any(pattern in name for name in names), pattern
    assert model._keep_in_fp32_modules is None


def test_compile_repeated_blocks(kit, base_output, monkeypatch):
    """Regional compilation compiles the entry the fused stage runtime calls (``forward_normed``),
    not only ``forward``, which it never calls."""
    compiled = []
    real_compile = torch.compile

    def counting_compile(fn=None, *args, **kwargs):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    model = kit.build(0)
    model.compile_repeated_blocks(backend="eager")
    blocks = [b for blocks in model.stage_blocks for b in blocks]
    assert compiled.count("forward_normed") == len(blocks)
    monkeypatch.undo()
    assert_close(kit.output(model), base_output, atol=ATOL, rtol=RTOL)

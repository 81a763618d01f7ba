"""`mosaicdiff.prune` on a U-Net, and the mosaic inside StableDiffusionXLPipeline (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mosaicdiff
from mosaicdiff.method import schedule
from mosaicdiff.api import prune_stages
from mosaicdiff.families.unet.adapter import UNET
from mosaicdiff.core.schedulers import scheduler_alphas_cumprod
from mosaicdiff.families.unet.model import MosaicUNet
from tests.method.test_unet_adapter import TEXT, calibration, tiny_unet


def test_sdxl_schedule_gives_the_closed_form_stages():
    """scaled_linear betas 0.00085-0.012: the closed form puts the middle stage at [198, 783)."""
    abar = scheduler_alphas_cumprod(UNET.default_scheduler())
    assert schedule.stage_boundaries(abar, x0_sq_norm=1.0) == (198, 783)


@pytest.mark.parametrize("method", ["mosaic", "uniform", "magnitude", "random"])
def test_prune_returns_a_stage_switching_unet(method):
    unet, cal = tiny_unet(), calibration(6)
    data = cal if method in ("mosaic", "uniform") else None
    mosaic = mosaicdiff.prune(unet, data, 0.4, method=method, samples_per_stage=4, align=None, progress=False,
                              boundaries=(198, 783) if method == "mosaic" else None)
    assert isinstance(mosaic, MosaicUNet)
    names = [r[0] for r in mosaic.stage_ranges]
    assert names == (["early", "middle", "late"] if method == "mosaic" else ["all"])
    if method == "mosaic":
        assert [r[1:3] for r in mosaic.stage_ranges] == [(783, 1000), (198, 783), (0, 198)]
        assert mosaic.stage_ranges[1][3] < mosaic.stage_ranges[0][3]  # the middle stage is pruned least
    for blocks in mosaic.stage_blocks:
        assert all(min(b.heads) >= 1 for b in blocks)
    assert mosaic.meta["scheduler"] == "EulerDiscreteScheduler"


def test_prune_refuses_class_calibration_for_a_unet():
    from mosaicdiff.method.calibrate import Calibration

    with pytest.raises(TypeError, match="TextCalibration"):
        mosaicdiff.prune(tiny_unet(), Calibration(torch.randn(2, 4, 16, 16), torch.zeros(2)), 0.4, progress=False)


def _pipeline(unet, scheduler_name: str):
    pytest.importorskip("transformers")  # diffusers' SDXL pipeline module imports it
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    kind = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler_name]
    scheduler = kind(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler)


@pytest.mark.parametrize("scheduler_name", ["euler", "ddim", "dpm"])
def test_sparsity_zero_mosaic_matches_the_dense_unet_in_the_sdxl_pipeline(scheduler_name):
    unet = tiny_unet()
    pipe = _pipeline(unet, scheduler_name)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 7, TEXT, generator=g), torch.randn(1, 32, generator=g)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
              negative_pooled_prompt_embeds=torch.zeros_like(pooled), num_inference_steps=4, output_type="latent",
              height=32, width=32, guidance_scale=5.0)
    dense = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    pipe.unet = mosaicdiff.prune(unet, None, 0.0, method="magnitude", progress=False)
    out = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert_close(out, dense, atol=1e-4 * float(dense.abs().max()), rtol=1e-4)
    pipe.unet = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False)
    pruned = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert not torch.allclose(pruned, dense, atol=1e-3)  # the pruned U-Net really runs in the pipeline


def test_cross_kv_cache_computes_the_text_keys_once_per_run(monkeypatch):
    unet = tiny_unet()
    mosaic = mosaicdiff.prune(unet, None, 0.5, method="magnitude", progress=False)
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    kv_weights = [block.operands("kv2")[0].weight for block in mosaic.stage_blocks[0]]  # views in shared storage
    real_linear, counted = torch.nn.functional.linear, {"n": 0}

    def counting(inp, weight, bias=None):  # counts the GEMMs of the text states' k/v
        counted["n"] += any(weight.data_ptr() == kv.data_ptr() and weight.shape == kv.shape for kv in kv_weights)
        return real_linear(inp, weight, bias)

    t = torch.full((2,), 500)
    with torch.no_grad():
        want = mosaic(x, t, text, added_cond_kwargs=added).sample
        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        mosaic.enable_cross_kv_cache()
        got = [mosaic(x, t, text, added_cond_kwargs=added).sample for _ in range(3)]
        once = counted["n"]
        text.mul_(2.0)  # modified in place: the cache must notice
        changed = mosaic(x, t, text, added_cond_kwargs=added).sample
        monkeypatch.undo()
        mosaic.enable_cross_kv_cache(False)
        fresh = mosaic(x, t, text, added_cond_kwargs=added).sample
    assert once == len(kv_weights), f"k/v computed {once} times for {len(kv_weights)} blocks over 3 steps"
    assert counted["n"] == 2 * len(kv_weights)
    for a in got:
        assert_close(a, want, atol=0, rtol=0)
    assert_close(changed, fresh, atol=0, rtol=0)



def test_cross_kv_cache_covers_every_stage(monkeypatch):
    """Three stages of different widths: every stage's blocks cache their k/v (each block its own),
    so each stage computes the text keys once per block however often it runs, and going back to
    an earlier stage reuses that stage's cache."""
    unet = tiny_unet()
    stages = prune_stages(unet, None, 0.4, pruner="magnitude", boundaries=(198, 783), align=None, progress=False,
                          share_producers=True)
    mosaic = MosaicUNet.from_dense(unet, stages)
    assert mosaic.num_stages == 3 and mosaic.producer_storage is not None
    n_blocks = len(mosaic.stage_blocks[0])
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    real_linear, counted = torch.nn.functional.linear, {"n": 0}

    def counting(inp, weight, bias=None):  # counts the GEMMs on the text states (their k/v)
        counted["n"] += inp.data_ptr() == text.data_ptr() and inp.shape == text.shape
        return real_linear(inp, weight, bias)

    times = {stage: torch.full((2,), t) for stage, t in enumerate((900, 500, 100))}
    assert [mosaic.stage_for(t) for t in times.values()] == [0, 1, 2]
    with torch.no_grad():
        want = {s: mosaic(x, t, text, added_cond_kwargs=added).sample for s, t in times.items()}
        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        mosaic.enable_cross_kv_cache()
        per_stage = {}
        for s, t in times.items():
            before = counted["n"]
            for _ in range(3):
                assert_close(mosaic(x, t, text, added_cond_kwargs=added).sample, want[s], atol=1e-6, rtol=1e-6)
            per_stage[s] = counted["n"] - before
        before = counted["n"]
        assert_close(mosaic(x, times[0], text, added_cond_kwargs=added).sample, want[0], atol=1e-6, rtol=1e-6)
        again = counted["n"] - before
        text.mul_(2.0)  # modified in place: every stage's cache must notice
        changed = {s: mosaic(x, t, text, added_cond_kwargs=added).sample for s, t in times.items()}
        monkeypatch.undo()
        mosaic.enable_cross_kv_cache(False)
        assert not any(b.cache_cross_kv for s in mosaic.stage_blocks for b in s)
        fresh = {s: mosaic(x, t, text, added_cond_kwargs=added).sample for s, t in times.items()}
    assert per_stage == {0: n_blocks, 1: n_blocks, 2: n_blocks}, f"k/v GEMMs per stage over 3 steps: {per_stage}"
    assert again == 0, "stage 0's cache was lost while the other stages ran"
    for s in times:
        assert_close(changed[s], fresh[s], atol=1e-6, rtol=1e-6)



def test_cross_kv_cache_recomputes_for_a_new_tensor_at_a_reused_address():
    """The cache serves only the tensor it computed the k/v of: a new text-states tensor that the
    allocator places where a freed one was (the next pipeline run's prompt, the common case) has
    the same address, shape and version counter (0), and must still get its own k/v."""
    import numpy as np

    mosaic = mosaicdiff.prune(tiny_unet(), None, 0.5, method="magnitude", progress=False, share_producers=True)
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.full((2,), 500)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    prompts = [torch.randn(2, 7, TEXT, generator=g) for _ in range(6)]
    with torch.no_grad():
        want = [mosaic(x, t, p, added_cond_kwargs=added).sample for p in prompts]
        mosaic.enable_cross_kv_cache()
        # the same memory, deterministically: two tensors over one buffer, one after the other
        buffer = np.empty((2, 7, TEXT), dtype=np.float32)
        for k in (0, 1):
            buffer[...] = prompts[k].numpy()
            text = torch.from_numpy(buffer)  # a new tensor, version 0, at the previous one's address
            assert text._version == 0
            assert_close(mosaic(x, t, text, added_cond_kwargs=added).sample, want[k], atol=1e-6, rtol=1e-6,
                         msg=lambda m, k=k: f"prompt {k}: {m}")
            del text
        # freed and reallocated, as consecutive pipeline runs do (two steps per run)
        for k in range(2, 6):
            text = prompts[k].clone()
            for _ in range(2):
                assert_close(mosaic(x, t, text, added_cond_kwargs=added).sample, want[k], atol=1e-6, rtol=1e-6,
                             msg=lambda m, k=k: f"prompt {k}: {m}")
            del text


def test_save_and_load_round_trip(tmp_path):
    unet, cal = tiny_unet(), calibration(6)
    mosaic = mosaicdiff.prune(unet, cal, 0.4, samples_per_stage=4, align=None, progress=False)
    mosaic.save_pretrained(tmp_path / "m")
    loaded = MosaicUNet.from_pretrained(tmp_path / "m")
    assert loaded.stage_ranges == mosaic.stage_ranges and loaded.memory_report() == mosaic.memory_report()
    assert loaded.config.in_channels == 4 and loaded.config.addition_time_embed_dim == 8  # what pipelines read
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    for t in (900, 500, 100):
        tt = torch.full((2,), t)
        with torch.no_grad():
            assert_close(loaded(x, tt, text, added_cond_kwargs=added).sample,
                         mosaic(x, tt, text, added_cond_kwargs=added).sample, atol=0, rtol=0)
    half = MosaicUNet.from_pretrained(tmp_path / "m", torch_dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_load_refuses_folders_that_do_not_fit(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    mosaic = mosaicdiff.prune(tiny_unet(), None, 0.5, method="magnitude", progress=False)
    mosaic.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith("stage_blocks.0.3.ff2_weight"))
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=r"tensor 'stage_blocks.0.3.ff2_weight' in .*model.safetensors has shape"):
        MosaicUNet.from_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "format": "mosaicdiff.MosaicDiT"}))
    with pytest.raises(ValueError, match="expected 'mosaicdiff.MosaicUNet'"):
        MosaicUNet.from_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match="saving a MosaicUNet there"):
        mosaic.save_pretrained(tmp_path / "m")  # the folder now holds another kind of mosaic



def test_load_refuses_format_versions_it_cannot_read(tmp_path):
    """Reads 1.x (copies only) and 2.x: a 3.0 folder is refused naming both versions, and a 1.x
    config that has shared_producers (a 2.0 field) is refused rather than read as 1.x."""
    import json
    import re

    mosaic = mosaicdiff.prune(tiny_unet(), None, 0.5, method="magnitude", progress=False, share_producers=True)
    mosaic.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["format_version"] == MosaicUNet.format_version == "2.0" and cfg["shared_producers"]
    cfg_path.write_text(json.dumps({**cfg, "format_version": "2.7"}))  # a newer minor: read, with a warning
    assert MosaicUNet.from_pretrained(tmp_path / "m").producer_storage is not None
    cfg_path.write_text(json.dumps({**cfg, "format_version": "3.0"}))
    with pytest.raises(ValueError, match=r"has format version 3\.0 .* reads format versions 1\.x, 2\.x \(writes "
                                         + re.escape(MosaicUNet.format_version) + r"\)"):
        MosaicUNet.from_pretrained(tmp_path / "m")
    for old in ("1.0", "1.3"):
        cfg_path.write_text(json.dumps({**cfg, "format_version": old}))
        with pytest.raises(ValueError, match=r"a format 1\.x config with shared_producers \(introduced in "
                                             r"format 2\.0\)"):
            MosaicUNet.from_pretrained(tmp_path / "m")


def test_cuda_graph_path_and_per_stage_kernel_shapes():
    """The graph path (`forward_stage`: tensors only) gives the eager output (off CUDA the runner
    runs it eagerly); the kernel shapes follow each block's resolution level."""
    from mosaicdiff.families.unet.testing import call, tiny_dense, tiny_inputs

    from mosaicdiff.families import unet
    from tests.families.conformance import three_stage_mosaic

    dense = tiny_dense()
    mosaic = three_stage_mosaic(unet.FAMILY, dense, share_producers=True)
    x, cond = tiny_inputs(dense, 2)
    t = torch.tensor([100, 900])  # two stages in one batch
    assert {s for s, _ in mosaic.stage_rows(t, 2)} == {mosaic.stage_for(100), mosaic.stage_for(900)} == {0, 2}
    want = call(mosaic, x, t, cond)
    mosaic.enable_cross_kv_cache(True)
    mosaic.enable_cuda_graphs(True)
    assert mosaic.cuda_graphs_enabled and not any(b.cache_cross_kv for s in mosaic.stage_blocks for b in s)
    assert_close(call(mosaic, x, t, cond), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CUDA graphs"):
        mosaic.enable_cross_kv_cache(True)
    assert mosaic._block_levels == _measured_levels(dense, x, cond)
    shapes = mosaic.stage_kernel_shapes(0, 2, 16 * 16, torch.float32)
    attention = {shape for op, shape, _ in shapes if op == "attention"}
    assert attention and all(s[:2] == (2, 64) and s[3] == 16 for s in attention), attention
    assert mosaic.autotune_kernels(2, 16 * 16, ops=("attention",)) is not None



def _kernel_lookups(monkeypatch, run) -> set[tuple[str, tuple[int, ...]]]:
    """The ``(op, shape)`` of every kernel op `run()` calls, in the shape its per-shape config is
    looked up with (GEMMs: the ``(M, N, K)`` given to the GEMM path choice; attention: its
    ``get_config`` key ``(B, L, heads, head_dim)``; row ops: their ``(B, L, C)`` input)."""
    from mosaic_kernels import configs, ops
    from mosaic_kernels.ops import _dispatch

    seen = set()
    real_path, real_get = _dispatch.gemm_path, configs.get_config

    def gemm_path(op, x, M, N, K):
        seen.add((op, (int(M), int(N), int(K))))
        return real_path(op, x, M, N, K)

    def get_config(op, shape, dtype, device):
        if op == "attention":
            seen.add((op, tuple(int(s) for s in shape)))
        return real_get(op, shape, dtype, device)

    def row_op(name):
        real = getattr(ops, name)

        def record(x, *args, **kwargs):
            seen.add((name, tuple(x.shape)))
            return real(x, *args, **kwargs)
        return record

    with monkeypatch.context() as m:
        m.setattr(_dispatch, "gemm_path", gemm_path)
        m.setattr(configs, "get_config", get_config)
        for name in ("layer_norm", "residual_layer_norm"):
            m.setattr(ops, name, row_op(name))
        run()
    return seen


def test_stage_kernel_shapes_are_the_shapes_each_stage_runs(monkeypatch):
    """Per stage, `stage_kernel_shapes` (what `autotune_kernels` tunes) is exactly the set of
    kernel shapes that stage's forward looks its configs up with: three hand-made stages whose
    attn1 / attn2 / GEGLU widths all differ, on a layout with blocks at two resolutions."""
    from mosaicdiff.core.stages import StageSpec
    from mosaicdiff.families.unet.adapter import transformer_blocks
    from mosaicdiff.families.unet.testing import tiny_inputs
    from mosaicdiff.method import compact

    dense = tiny_unet(sdxl=False)
    blocks = transformer_blocks(dense)
    sparsities = {"late": {"attn1": 0.5, "attn2": 0.0, "ff": 0.5}, "middle": {"attn1": 0.0, "attn2": 0.5, "ff": 0.25},
                  "early": {"attn1": 0.25, "attn2": 0.7, "ff": 0.75}}
    specs = [StageSpec(name, t0, t1, 0.5, [UNET.compact_block(b, compact.prune_groups(
        UNET.groups(b), None, sparsities[name], method="magnitude", align=None)) for b in blocks])
        for name, t0, t1 in (("late", 0, 300), ("middle", 300, 700), ("early", 700, 1000))]
    mosaic = MosaicUNet.from_dense(dense, specs)
    widths = [[b.heads + (b.mlp_width,) for b in s] for s in mosaic.stage_blocks]
    assert len({tuple(w) for w in widths}) == 3 and any(h1 != h2 for s in widths for h1, h2, _ in s)
    assert set(mosaic._block_levels) == {0, 1}
    x, cond = tiny_inputs(dense, 2)
    cond = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    for stage, t in enumerate((100, 500, 900)):
        assert mosaic.stage_for(t) == stage
        with torch.no_grad():
            ran = _kernel_lookups(monkeypatch, lambda t=t: mosaic(x, torch.full((2,), t), **cond))
        listed = mosaic.stage_kernel_shapes(stage, 2, 16 * 16, torch.float32)
        assert all(dtype == torch.float32 for _, _, dtype in listed)
        assert {(op, shape) for op, shape, _ in listed} == ran, f"stage {stage}"


def _measured_levels(dense, x, cond) -> list[int]:
    """Each transformer block's halvings of the latent, read off the tokens it sees in a forward."""
    from mosaicdiff.families.unet.adapter import transformer_blocks

    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for b in transformer_blocks(dense)]
    with torch.no_grad():
        dense(x, torch.tensor([10, 10]), **cond)
    for h in hooks:
        h.remove()
    order = {id(b): i for i, b in enumerate(transformer_blocks(dense))}
    assert len(seen) == len(order)
    tokens = x.shape[-2] * x.shape[-1]
    # hooks fire in execution order (down, mid, up); transformer_blocks order is the module order
    by_block = dict(zip([id(b) for b in _execution_order(dense)], seen))
    return [{tokens // 4 ** k: k for k in range(6)}[by_block[i]] for i in sorted(by_block, key=order.get)]


def _execution_order(dense):
    from mosaicdiff.families.unet.adapter import transformer_blocks

    blocks = transformer_blocks(dense)
    names = {id(m): n for n, m in dense.named_modules()}
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(blocks, key=lambda b: (rank[names[id(b)].split(".")[0]], names[id(b)]))


def test_block_levels_of_an_sd15_layout():
    from mosaicdiff.families.unet.testing import tiny_inputs

    dense = tiny_unet(sdxl=False)
    mosaic = mosaicdiff.prune(dense, None, 0.3, method="magnitude", align=None, progress=False)
    x, cond = tiny_inputs(dense, 2)
    cond = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    levels = _measured_levels(dense, x, cond)
    assert set(levels) == {0, 1} and mosaic._block_levels == levels

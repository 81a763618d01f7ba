"""attention: SDPA over strided q/k/v views of a fused qkv, against reference.attention_ref."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mosaic_kernels as mk
from mosaic_kernels.ops.attention import attention_eager
from mosaic_kernels.reference import attention_ref

# (B, L, H, hd): DiT head_dim 72, 32, an odd 36, L = 1, B = 3, a pruned head count.
SHAPES = [
    (2, 16, 3, 72),
    (1, 1, 2, 32),
    (3, 7, 5, 36),
    (2, 9, 1, 72),
]

# fp32: softmax and two matmuls in another order, ~1e-6 for O(1) values -> 1e-5. bf16/fp16:
# SDPA keeps the softmax statistics in fp32 but may round the probabilities to the input dtype
# before P @ V, an error up to 1 ulp of each weight times max|v| (each output is a convex
# combination of v rows), plus the final rounding; atol = 2 ulp * max|v| covers both.
BF16_REL = 2.0**-7
FP16_REL = 2.0**-10
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2 * BF16_REL, 2 * BF16_REL, id="bf16"),
    pytest.param(torch.float16, 2 * FP16_REL, 2 * FP16_REL, id="fp16"),
]


@pytest.mark.parametrize("dtype, ulp_atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("B, L, H, hd", SHAPES, ids=str)
def test_matches_reference(device, B, L, H, hd, dtype, ulp_atol, rtol, check_close):
    qkv = torch.randn(B, L, 3 * H * hd).to(device, dtype)
    out = mk.attention(qkv, H)
    assert out.shape == (B, L, H * hd) and out.dtype == dtype and out.is_contiguous()
    v_max = qkv[..., 2 * H * hd:].float().abs().max().item()
    atol = 1e-5 if dtype == torch.float32 else ulp_atol * v_max
    check_close(out, attention_ref(qkv.float(), H), atol, rtol, f"attention {(B, L, H, hd)} {dtype}")


def test_heads_are_independent(device, check_close):
    """Head i of the output depends only on head i of q, k and v (layout [q | k | v], heads contiguous)."""
    B, L, H, hd = 1, 6, 3, 8
    qkv = torch.randn(B, L, 3 * H * hd, device=device)
    per_head = []
    for i in range(H):
        cols = [p * H * hd + i * hd + j for p in range(3) for j in range(hd)]
        per_head.append(attention_ref(qkv[..., cols], 1))
    check_close(mk.attention(qkv, H), torch.cat(per_head, dim=-1), 1e-5, 1e-5, "per-head")


def _head_major(qkv: torch.Tensor, H: int) -> torch.Tensor:
    """The same projections as ``qkv`` ([q | k | v]) re-laid out head-major (q k v per head), by index."""
    hd = qkv.shape[-1] // (3 * H)
    cols = [p * H * hd + i * hd + j for i in range(H) for p in range(3) for j in range(hd)]
    return qkv[..., cols].contiguous()


@pytest.mark.parametrize("dtype, ulp_atol, rtol", DTYPE_TOLS[:2])
@pytest.mark.parametrize("B, L, H, hd", SHAPES, ids=str)
def test_head_major_layout_computes_the_same_attention(device, B, L, H, hd, dtype, ulp_atol, rtol, check_close):
    """layout="heads" on re-laid-out projections equals the [q | k | v] reference on the original ones."""
    qkv = torch.randn(B, L, 3 * H * hd).to(device, dtype)
    heads = _head_major(qkv, H)
    want = attention_ref(qkv.float(), H)
    atol = 1e-5 if dtype == torch.float32 else ulp_atol * qkv[..., 2 * H * hd:].float().abs().max().item()
    check_close(mk.attention(heads, H, layout="heads"), want, atol, rtol, f"heads layout {(B, L, H, hd)} {dtype}")
    check_close(attention_ref(heads.float(), H, layout="heads"), want, 1e-6, 1e-6, "reference, heads layout")
    check_close(attention_eager(heads, H, layout="heads"), want, atol, rtol, "plain torch, heads layout")
    if H > 1:  # the two layouts really differ: reading head-major data as [q | k | v] is wrong
        assert not torch.allclose(mk.attention(heads, H).float(), want, atol=1e-2)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["qkv", "heads"])
def test_no_copies_before_sdpa(device, layout):
    """q, k, v reach SDPA as views of qkv: no clone/contiguous/copy ops run before it."""
    qkv = torch.randn(2, 5, 3 * 2 * 72, device=device)
    with _RecordOps() as rec:
        mk.attention(qkv, 2, layout=layout)
    first_sdpa = next(i for i, name in enumerate(rec.ops) if "scaled_dot_product" in name)
    copies = [n for n in rec.ops[:first_sdpa] if any(c in n for c in ("clone", "copy", "contiguous", "_to_copy"))]
    assert not copies, f"copies before SDPA: {copies}; all ops: {rec.ops}"


@pytest.mark.parametrize(
    "qkv, heads, error, match",
    [
        (torch.zeros(2, 5, 3 * 2 * 8), 0, ValueError, "num_heads must be a positive int"),
        (torch.zeros(2, 5, 50), 2, ValueError, "3 \\* num_heads \\* head_dim with num_heads=2, got 50"),
        (torch.zeros(10, 48), 2, ValueError, "qkv must be 3-D"),
        (torch.zeros(2, 5, 48, dtype=torch.float64), 2, TypeError, "got torch.float64"),
        (torch.zeros(2, 48, 5).transpose(1, 2), 2, ValueError, "unit stride in its last dim"),
    ],
)
def test_bad_inputs_raise(qkv, heads, error, match):
    with pytest.raises(error, match=match):
        mk.attention(qkv, heads)


def test_unknown_layout_raises():
    with pytest.raises(ValueError, match="layout must be one of"):
        mk.attention(torch.zeros(1, 2, 48), 2, layout="qvk")


def _runnable_backends(device: torch.device) -> list[str]:
    """SDPA kernels this device runs for fp32 (CPU: math and flash; CUDA: whatever torch reports)."""
    if device.type != "cuda":
        return ["auto", "math", "flash"]
    return ["auto", "math", "flash", "efficient", "cudnn"]


@pytest.mark.parametrize("B, L, H, hd", [(2, 16, 3, 72), (3, 7, 5, 36)], ids=str)
def test_every_pinned_sdpa_backend_matches_reference(device, B, L, H, hd, check_close):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = torch.randn(B, L, 3 * H * hd).to(device, dtype)
    want = attention_ref(qkv.float(), H)
    v_max = qkv[..., 2 * H * hd:].float().abs().max().item()
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2 * BF16_REL * v_max, 2 * BF16_REL)
    for backend in _runnable_backends(device):
        try:
            out = mk.attention(qkv, H, backend=backend)
        except RuntimeError as exc:  # a kernel torch cannot run on this card/shape says so itself
            assert device.type == "cuda" and backend in ("flash", "efficient", "cudnn"), exc
            continue
        check_close(out, want, atol, rtol, f"sdpa_{backend} {(B, L, H, hd)}")


def test_sdpa_backend_comes_from_the_config_and_is_recorded(device, monkeypatch):
    """The configured SDPA kernel is the one that runs: pinning "math" through the config shows
    up in the dispatch record, and a kernel the CPU lacks (cuDNN) fails loudly, not silently."""
    from mosaic_kernels import configs, ops

    qkv = torch.randn(1, 4, 3 * 2 * 8, device=device)
    assert configs.get_config("attention", (1, 4, 2, 8), qkv.dtype, device) == {"sdpa_backend": "auto"}
    monkeypatch.setattr(configs, "get_config", lambda op, shape, dtype, dev: {"sdpa_backend": "math"})
    with ops.record_dispatch() as calls:
        mk.attention(qkv, 2)
    assert calls == {("attention", "sdpa_math"): 1}
    if device.type == "cpu":
        monkeypatch.setattr(configs, "get_config", lambda op, shape, dtype, dev: {"sdpa_backend": "cudnn"})
        with pytest.raises(RuntimeError):
            mk.attention(qkv, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.attention(qkv, 2, backend="fast")


def test_attention_choice_is_measured_over_every_sdpa_kernel(tmp_config_cache):
    """configs.measure times each SDPA kernel the choice names (through the op's own benchmark
    providers) and keeps the fastest; the op then runs it."""
    from mosaic_kernels import configs, ops
    from mosaic_kernels.ops.attention import SDPA_CHOICES

    shape = (2, 16, 2, 8)
    assert configs.shape_bucket("attention", shape) == "B2_L16_H2_hd8"
    assert configs.shape_bucket("attention", (16, 256, 6, 72)) == "B16_L256_H6_hd72"
    assert tuple(ops.BENCH_CASES["attention"].choice.options) == SDPA_CHOICES == ("auto", "flash", "efficient", "cudnn")
    timed = []

    def timer(fn):
        with ops.record_dispatch() as calls:
            try:
                fn()  # a kernel this device lacks raises: that option is skipped
            finally:
                timed.extend(backend for _, backend in calls)
        return {"sdpa_auto": 3.0, "sdpa_flash": 1.0, "sdpa_efficient": 2.0, "sdpa_cudnn": 4.0}[timed[-1]]

    picked = configs.measure("attention", shape, torch.float32, "cpu", timer=timer, persist=False)
    assert picked == {"sdpa_backend": "flash"}
    assert timed == ["sdpa_auto", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]  # each kernel really ran
    with ops.record_dispatch() as calls:
        mk.attention(torch.randn(2, 16, 3 * 2 * 8), 2)
    assert calls == {("attention", "sdpa_flash"): 1}
    configs.clear_memo()
    with pytest.raises(ValueError, match=r"\(B, L, H, hd\)"):
        configs.shape_bucket("attention", (16, 256, 6))

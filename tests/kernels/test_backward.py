"""Backward of every op: its gradients against torch autograd through the float64 oracle.

No op has a backward kernel: each custom op's registered backward recomputes its reference in
fp32 and differentiates it (``mosaic_kernels/ops/_autograd.py``); ``attention`` goes through
SDPA's backward. The oracle is independent of both: autograd on the float64 formulations of
``oracle.py`` (``F.layer_norm``, ``F.gelu``, ``addcmul``, einsum attention), fed the same
(dtype-exact) inputs and the same upstream gradients.

Shapes are drawn per (op, seed) from awkward sizes (odd and prime widths, one row, one column),
small enough for the Triton interpreter, which runs the forward under the ``triton`` pin.

Tolerances, relative to the largest expected gradient of each input (``scale``):
fp32: the backward is an fp32 computation of the same sums (<= ~40 terms here) in another
order, a few fp32 ulps -> ``1e-5 * scale``, rtol 1e-5. bf16: each gradient is computed in fp32
and rounded once to the input's dtype: <= 1 bf16 ulp (``2**-7 |g|``); rtol allows 2, atol covers
gradients that cancel to ~0. attention in bf16 runs SDPA's bf16 backward, which rounds its
intermediates (``O``, ``dP``) to bf16 as well: ``2**-5`` of the scale.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import mosaic_kernels as mk
import oracle
from tolerances import BF16_REL

ROW_WIDTHS = [1, 3, 7, 13, 33, 72]
GEMM_K = [1, 5, 13, 33]
GEMM_N = [3, 7, 17, 40]
SEEDS = [0, 1, 2]

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2 * BF16_REL, 2 * BF16_REL, id="bf16"),
]
ATTENTION_BF16_TOL = 2.0**-5

Spec = tuple[dict[str, torch.Tensor | None], Callable, Callable]


def _rows(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(1, 3), rng.randint(1, 5), rng.choice(ROW_WIDTHS)


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale + shift


# Each spec: (fp32 values of the differentiable inputs, the op on them, the oracle on them).
# ``None`` marks an absent optional tensor. Modulation vectors are chunks of one (B, n * D)
# adaLN vector (row stride n * D), as a DiT block passes them.


def _ln_modulate(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    t = {"x": _randn(gen, B, L, D, scale=2, shift=0.5), "mod": _randn(gen, B, 2 * D, scale=0.5)}
    return (t, lambda t: mk.ln_modulate(t["x"], *t["mod"].chunk(2, -1)),
            lambda t: oracle.ln_modulate(t["x"], *t["mod"].chunk(2, -1)))


def _gated_residual(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    t = {"res": _randn(gen, B, L, D), "gate": _randn(gen, B, D), "y": _randn(gen, B, L, D)}
    return (t, lambda t: mk.gated_residual(t["res"], t["gate"], t["y"]),
            lambda t: oracle.gated_residual(t["res"], t["gate"], t["y"]))


def _gated_residual_ln_modulate(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    t = {"res": _randn(gen, B, L, D), "y": _randn(gen, B, L, D), "mod": _randn(gen, B, 3 * D, scale=0.5)}

    def run(fn):
        return lambda t: fn(t["res"], t["mod"][:, :D], t["y"], t["mod"][:, D:2 * D], t["mod"][:, 2 * D:])

    return t, run(mk.gated_residual_ln_modulate), run(oracle.gated_residual_ln_modulate)


def _ln_modulate_table(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    t = {"x": _randn(gen, B, L, D, scale=2, shift=0.5), "mod": _randn(gen, B, 6 * D, scale=0.5),
         "table": _randn(gen, 6, D, scale=0.3)}

    def run(fn):  # PixArt's (shift_msa, scale_msa): chunks 0 and 1 of the adaLN-single output
        return lambda t: fn(t["x"], t["mod"][:, :D], t["mod"][:, D:2 * D], t["table"][0], t["table"][1])

    return t, run(mk.ln_modulate_table), run(oracle.ln_modulate_table)


def _gated_residual_ln_modulate_table(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    t = {"res": _randn(gen, B, L, D), "y": _randn(gen, B, L, D), "mod": _randn(gen, B, 6 * D, scale=0.5),
         "table": _randn(gen, 6, D, scale=0.3)}

    def run(fn):  # gate_mlp (chunk 5) then the next block's shift_msa / scale_msa (chunks 0, 1)
        return lambda t: fn(t["res"], t["mod"][:, 5 * D:], t["y"], t["mod"][:, :D], t["mod"][:, D:2 * D],
                            t["table"][5], t["table"][0], t["table"][1])

    return t, run(mk.gated_residual_ln_modulate_table), run(oracle.gated_residual_ln_modulate_table)


def _layer_norm(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    affine = rng.choice(["both", "weight", "none"])
    t = {"x": _randn(gen, B, L, D, scale=2, shift=-0.5),
         "weight": _randn(gen, D, scale=0.5, shift=1) if affine != "none" else None,
         "bias": _randn(gen, D) if affine == "both" else None}
    return (t, lambda t: mk.layer_norm(t["x"], t["weight"], t["bias"], 1e-5),
            lambda t: oracle.layer_norm(t["x"], t["weight"], t["bias"], 1e-5))


def _residual_layer_norm(rng, gen) -> Spec:
    B, L, D = _rows(rng)
    with_bias = rng.random() < 0.7
    t = {"res": _randn(gen, B, L, D), "y": _randn(gen, B, L, D), "weight": _randn(gen, D, scale=0.5, shift=1),
         "bias": _randn(gen, D) if with_bias else None}
    return (t, lambda t: mk.residual_layer_norm(t["res"], t["y"], t["weight"], t["bias"], 1e-5),
            lambda t: oracle.residual_layer_norm(t["res"], t["y"], t["weight"], t["bias"], 1e-5))


def _gemm(rng, gen, N_mult: int = 1) -> tuple[int, int, int, int, dict]:
    B, L = rng.randint(1, 3), rng.randint(1, 5)
    K, N = rng.choice(GEMM_K), rng.choice(GEMM_N)
    with_bias = rng.random() < 0.7
    t = {"x": _randn(gen, B, L, K), "weight": _randn(gen, N * N_mult, K, scale=K**-0.5),
         "bias": _randn(gen, N * N_mult, scale=0.5) if with_bias else None}
    return B, L, K, N, t


def _rms_norm_rope(rng, gen) -> Spec:
    B, S, H = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 3)
    D = rng.choice([2, 8, 24, 40])
    rope, with_weight = rng.random() < 0.7, rng.random() < 0.7
    angles = torch.rand(S, D // 2, generator=gen) * 6.3
    t = {"qkv": _randn(gen, B, S, 3, H, D, scale=2, shift=0.3),
         "weight": _randn(gen, D, scale=0.2, shift=1) if with_weight else None,
         "cos": angles.cos().repeat_interleave(2, -1) if rope else None,
         "sin": angles.sin().repeat_interleave(2, -1) if rope else None}

    def table(t, name):  # RoPE tables stay float32 whatever the test dtype (the op's contract)
        return None if t[name] is None else t[name].float()

    def run(fn):  # the keys of a fused qkv output: a strided view
        return lambda t: fn(t["qkv"][:, :, 1], t["weight"], table(t, "cos"), table(t, "sin"), 1e-6)

    return t, run(mk.rms_norm_rope), run(oracle.rms_norm_rope)


def _linear_gelu(rng, gen) -> Spec:
    _, _, _, _, t = _gemm(rng, gen)
    return (t, lambda t: mk.linear_gelu(t["x"], t["weight"], t["bias"]),
            lambda t: oracle.linear_gelu(t["x"], t["weight"], t["bias"]))


def _linear_geglu(rng, gen) -> Spec:
    separate_gate = rng.random() < 0.5
    _, _, _, inner, t = _gemm(rng, gen, N_mult=1 if separate_gate else 2)
    if not separate_gate:
        return (t, lambda t: mk.linear_geglu(t["x"], t["weight"], t["bias"]),
                lambda t: oracle.linear_geglu(t["x"], t["weight"], t["bias"]))
    K = t["x"].shape[-1]
    t["gate_weight"] = _randn(gen, inner, K, scale=K**-0.5)
    t["gate_bias"] = None if t["bias"] is None else _randn(gen, inner, scale=0.5)

    def want(t):  # diffusers GEGLU over the two separate projections
        return oracle.linear(t["x"], t["weight"], t["bias"]) * F.gelu(oracle.linear(t["x"], t["gate_weight"],
                                                                                     t["gate_bias"]))

    return (t, lambda t: mk.linear_geglu(t["x"], t["weight"], t["bias"], gate_weight=t["gate_weight"],
                                         gate_bias=t["gate_bias"]), want)


def _linear_gated_residual(rng, gen) -> Spec:
    B, L, _, N, t = _gemm(rng, gen)
    t.update(mod=_randn(gen, B, 2 * N), res=_randn(gen, B, L, N))
    return (t, lambda t: mk.linear_gated_residual(t["x"], t["weight"], t["bias"], t["mod"][:, N:], t["res"]),
            lambda t: oracle.linear_gated_residual(t["x"], t["weight"], t["bias"], t["mod"][:, N:], t["res"]))


def _linear_residual(rng, gen) -> Spec:
    B, L, _, N, t = _gemm(rng, gen)
    t["res"] = _randn(gen, B, L, N)
    return (t, lambda t: mk.linear_residual(t["x"], t["weight"], t["bias"], t["res"]),
            lambda t: oracle.linear_residual(t["x"], t["weight"], t["bias"], t["res"]))


def _heads_to_qkv(qkv: torch.Tensor, H: int) -> torch.Tensor:
    """A head-major ``[q k v of head 0 | ...]`` qkv rearranged to ``[q | k | v]``."""
    B, L, width = qkv.shape
    return qkv.reshape(B, L, H, 3, width // (3 * H)).transpose(2, 3).reshape(B, L, width)


def _attention(rng, gen) -> Spec:
    B, L, H, hd = rng.randint(1, 2), rng.randint(1, 7), rng.randint(1, 3), rng.choice([1, 3, 8, 13])
    layout = rng.choice(["qkv", "heads"])
    t = {"qkv": _randn(gen, B, L, 3 * H * hd)}
    if layout == "qkv":
        return t, lambda t: mk.attention(t["qkv"], H), lambda t: oracle.attention(t["qkv"], H)
    return (t, lambda t: mk.attention(t["qkv"], H, layout="heads"),
            lambda t: oracle.attention(_heads_to_qkv(t["qkv"], H), H))


SPECS: dict[str, Callable[[random.Random, torch.Generator], Spec]] = {
    "ln_modulate": _ln_modulate,
    "gated_residual": _gated_residual,
    "gated_residual_ln_modulate": _gated_residual_ln_modulate,
    "linear_gelu": _linear_gelu,
    "linear_gated_residual": _linear_gated_residual,
    "attention": _attention,
    "layer_norm": _layer_norm,
    "linear_geglu": _linear_geglu,
    "residual_layer_norm": _residual_layer_norm,
    "linear_residual": _linear_residual,
    "ln_modulate_table": _ln_modulate_table,
    "gated_residual_ln_modulate_table": _gated_residual_ln_modulate_table,
    "rms_norm_rope": _rms_norm_rope,
}


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _grads(run: Callable, values: dict[str, torch.Tensor | None], dtype: torch.dtype,
           upstream: list[torch.Tensor] | None, gen: torch.Generator):
    """(upstream grads, {name: grad}) of ``run`` over ``values`` cast to ``dtype``, all requiring grad."""
    leaves = {k: None if v is None else v.to(dtype).requires_grad_(True) for k, v in values.items()}
    outs = _as_tuple(run(leaves))
    if upstream is None:
        upstream = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    names = [k for k, v in leaves.items() if v is not None]
    got = torch.autograd.grad(outs, [leaves[k] for k in names], [g.to(o.dtype) for g, o in zip(upstream, outs)])
    for k, g in zip(names, got):
        assert g.dtype == leaves[k].dtype and g.shape == leaves[k].shape, (k, g.dtype, g.shape)
    return upstream, dict(zip(names, got))


def test_every_op_has_a_spec():
    assert sorted(SPECS) == sorted(mk.ops.BENCH_CASES)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.op(op)) for op in SPECS])
def test_grads_match_float64_oracle(backend, op, seed, dtype, atol, rtol, check_close):
    """Every floating input's gradient against autograd through the float64 oracle."""
    gen = torch.Generator().manual_seed(seed)
    values, run_op, run_oracle = SPECS[op](random.Random(f"{op}-{seed}"), gen)
    values = {k: None if v is None else v.to(dtype).float() for k, v in values.items()}  # dtype-exact
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = {k: None if v is None else v.to(device) for k, v in values.items()}
    upstream, got = _grads(run_op, values, dtype, None, gen)
    _, want = _grads(run_oracle, values, torch.float64, [g.double() for g in upstream], gen)
    assert got.keys() == want.keys()
    if op == "attention" and dtype == torch.bfloat16:
        atol, rtol = ATTENTION_BF16_TOL, ATTENTION_BF16_TOL
    for name in got:
        scale = max(1.0, want[name].abs().max().item()) if want[name].numel() else 1.0
        shapes = {k: tuple(v.shape) for k, v in values.items() if v is not None}
        check_close(got[name], want[name], atol * scale, rtol, f"{op} d{name} {shapes} {dtype} [{backend}]")


def test_mixed_dtype_modulation_gets_grads_in_its_own_dtype(check_close):
    """bf16 activations with fp32 shift/scale (diffusers' fp32 timestep embedding)."""
    x = torch.randn(2, 3, 13).bfloat16().requires_grad_()
    shift, scale = (torch.randn(2, 13, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 3, 13).bfloat16()
    dx, dshift, dscale = torch.autograd.grad(mk.ln_modulate(x, shift, scale), (x, shift, scale), g)
    assert (dx.dtype, dshift.dtype, dscale.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    x64, shift64, scale64 = (t.detach().double().requires_grad_() for t in (x, shift, scale))
    want = torch.autograd.grad(oracle.ln_modulate(x64, shift64, scale64), (x64, shift64, scale64), g.double())
    check_close(dx, want[0], 2 * BF16_REL * want[0].abs().max().item(), 2 * BF16_REL, "dx")
    for got, w, name in ((dshift, want[1], "dshift"), (dscale, want[2], "dscale")):
        check_close(got, w, 1e-5 * w.abs().max().item(), 1e-5, name)


def test_frozen_weight_and_lora_factors():
    """LoRA: the base weight does not require grad (it gets none), the low-rank factors do."""
    x = torch.randn(2, 5, 13, requires_grad=True)
    base, bias = torch.randn(17, 13), torch.randn(17)
    down, up = torch.randn(4, 13, requires_grad=True), torch.randn(17, 4, requires_grad=True)
    gate, res = torch.randn(2, 17), torch.randn(2, 5, 17)
    out = mk.linear_gated_residual(x, base + up @ down, bias, gate, res)
    out.square().sum().backward()
    assert base.grad is None and bias.grad is None and gate.grad is None and res.grad is None
    x64, down64, up64 = (t.detach().double().requires_grad_() for t in (x, down, up))
    want = oracle.linear_gated_residual(x64, base.double() + up64 @ down64, bias, gate, res)
    want.square().sum().backward()
    for got, w in ((x.grad, x64.grad), (down.grad, down64.grad), (up.grad, up64.grad)):
        torch.testing.assert_close(got.double(), w, atol=1e-4 * w.abs().max().item(), rtol=1e-4)


def test_unused_output_and_no_grad_inputs():
    """Only one output of a two-output op used; an op whose inputs need no grad stays out of the graph."""
    res, y = torch.randn(2, 3, 7, requires_grad=True), torch.randn(2, 3, 7)
    _, normed = mk.residual_layer_norm(res, y, None, None, 1e-5)
    (dres,) = torch.autograd.grad((normed * normed[..., :1]).sum(), (res,))  # h unused
    res64 = res.detach().double().requires_grad_()
    _, normed64 = oracle.residual_layer_norm(res64, y, None, None, 1e-5)
    (want,) = torch.autograd.grad((normed64 * normed64[..., :1]).sum(), (res64,))
    torch.testing.assert_close(dres.double(), want, atol=1e-5, rtol=1e-5)
    assert not mk.layer_norm(torch.randn(2, 7), None, None).requires_grad


@pytest.mark.parametrize("op", ["ln_modulate", "gated_residual_ln_modulate", "linear_geglu", "layer_norm"])
def test_gradcheck_float64(op):
    """gradcheck of the registered formula on tiny float64 inputs (the custom op itself, torch
    backend: the public ops take fp32/fp16/bf16 only). The reference computes in fp32 whatever the
    input dtype, so finite differences use eps=1e-3 (rounding error ~1e-7 / 1e-3) and 1e-3
    tolerances (central differences: O(eps**2) truncation)."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    fn, args = {
        "ln_modulate": (lambda *a: torch.ops.mosaic.ln_modulate(*a, 1e-6), (t(2, 3, 5), t(2, 5), t(2, 5))),
        "gated_residual_ln_modulate": (lambda *a: torch.ops.mosaic.gated_residual_ln_modulate(*a, 1e-6),
                                       (t(2, 3, 5), t(2, 5), t(2, 3, 5), t(2, 5), t(2, 5))),
        "linear_geglu": (torch.ops.mosaic.linear_geglu, (t(2, 3, 5), t(4, 5), t(4), t(4, 5), t(4))),
        "layer_norm": (lambda *a: torch.ops.mosaic.layer_norm(*a, 1e-5), (t(3, 7), t(7), t(7))),
    }[op]
    with mk.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, args, eps=1e-3, atol=1e-3, rtol=1e-3)


def test_opcheck_with_grads():
    """opcheck with inputs requiring grad: the autograd registration and the backward traced by
    AOTAutograd (dynamic shapes) against eager."""
    x, w, b = torch.randn(2, 3, 5), torch.randn(6, 5), torch.randn(6)
    args = [t.requires_grad_() for t in (x, w, b, torch.randn(2, 6), torch.randn(2, 3, 6))]
    torch.library.opcheck(torch.ops.mosaic.linear_gated_residual.default, args)
    args = [t.requires_grad_() for t in (torch.randn(2, 3, 7), torch.randn(2, 3, 7), torch.randn(7))] + [None, 1e-5]
    torch.library.opcheck(torch.ops.mosaic.residual_layer_norm.default, args)


def _block(x, mod, w1, b1, w2, b2, gw, gb, ln_w, wo):
    """A tiny DiT/SD block chain through all ten ops (two with two outputs, one with defaulted args)."""
    shift, scale, gate = mod.chunk(3, -1)
    h = mk.ln_modulate(x, shift, scale)
    a = mk.attention(torch.cat([h, h.flip(-1), h * 0.5], -1), 2)
    res, normed = mk.gated_residual_ln_modulate(x, gate, a, shift, scale)
    res = mk.linear_gated_residual(mk.linear_gelu(normed, w1, b1), w2, b2, gate, res)
    res, normed = mk.residual_layer_norm(res, mk.gated_residual(res, gate, a), ln_w, None, 1e-5)
    out = mk.linear_residual(mk.linear_geglu(normed, gw, gb), wo, None, res)
    return mk.layer_norm(out, None, None).square().sum() + res.sum()


def test_backward_under_torch_compile_fullgraph(check_close):
    """Backward through the ops compiled with fullgraph=True (a graph break raises), aot_eager:
    the backward graph is AOTAutograd's trace of the registered formulas."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    D, N = 6, 10
    shapes = [(2, 3, D), (2, 3 * D), (N, D), (N,), (D, N), (D,), (2 * 4, D), (2 * 4,), (D,), (D, 4)]
    values = [torch.randn(*s, generator=gen) for s in shapes]

    def grads(fn):
        leaves = [v.clone().requires_grad_() for v in values]
        fn(*leaves).backward()
        return [leaf.grad for leaf in leaves]

    eager = grads(_block)
    compiled = grads(torch.compile(_block, fullgraph=True, backend="aot_eager"))
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert c is not None, f"input {i} got no grad"
        check_close(c, e, 1e-5 * max(1.0, e.abs().max().item()), 1e-5, f"compiled grad of input {i}")

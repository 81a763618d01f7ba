"""Every registered op, generically: its public function, custom op and one fake, its benchmark
case and its registration (one import line in mosaic_kernels/ops/__init__.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels import ops, reference

CASES = dict(ops.BENCH_CASES)
CUSTOM_OPS = [op for op in CASES if hasattr(torch.ops.mosaic, op)]


def _inputs(op, dtype=torch.float32, device="cpu", seed=0):
    case = CASES[op]
    return case.make_inputs(case.tiny_shape, dtype, torch.device(device), torch.Generator(device).manual_seed(seed))


def test_every_op_is_public_and_registered_once():
    init = (Path(ops.__file__)).read_text()
    lines = re.findall(r"^from \.(\w+) import (\w+)$", init, re.MULTILINE)
    assert sorted(name for mod, name in lines if mod == name) == sorted(CASES), "one import line per op"
    for op in CASES:
        assert op in mk.__all__ and getattr(mk, op) is getattr(ops, op), op
        assert CASES[op].reference is getattr(reference, f"{op}_ref"), op
    assert {"layer_norm", "linear_geglu", "gated_residual"} <= set(CASES)
    assert set(CUSTOM_OPS) == set(CASES) - {"attention"}, "every op but attention is a custom op"


@pytest.mark.parametrize("op", CUSTOM_OPS)
def test_custom_op_and_its_fake(op):
    """opcheck: the schema, the fake (shapes alone) against the real op, and autograd registration."""
    args = _inputs(op)
    schema = getattr(torch.ops.mosaic, op).default._schema
    if len(args) < len(schema.arguments) and schema.arguments[len(args)].name == "eps":
        args = (*args, 1e-5)  # the bench inputs leave the (always explicit) eps of a norm op out
    torch.library.opcheck(getattr(torch.ops.mosaic, op).default, args)


@pytest.mark.parametrize("op", list(CASES))
def test_public_op_matches_its_reference_and_compiles_without_a_graph_break(op):
    """The bench case's inputs through the public op: the reference's result, eagerly and under
    torch.compile(fullgraph=True) (aot_eager: inductor's CPU codegen is too slow here)."""
    torch._dynamo.reset()
    fn, args = getattr(mk, op), _inputs(op)
    want = CASES[op].reference(*args)
    got = fn(*args)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for name, result in (("eager", got), ("compiled", compiled)):
        results, wants = (result, want) if isinstance(want, tuple) else ((result,), (want,))
        for r, w in zip(results, wants):
            torch.testing.assert_close(r, w, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{op} {n}: {m}")


@pytest.mark.parametrize("op", list(CASES))
def test_bench_case_is_consistent(op):
    """The case's canonical shapes make inputs the op accepts; its work model is positive."""
    case = CASES[op]
    e = torch.tensor([], dtype=torch.bfloat16).element_size()
    for shape in (case.tiny_shape, *case.model_shapes(16)):
        assert case.bytes_moved(shape, e) > 0 and case.flops(shape) >= 0, (op, shape)
    assert case.model_shapes(16) and case.model_shapes(64) != case.model_shapes(16), op
    providers = case.providers()
    assert "reference" not in providers and providers, op
    if case.choice is not None:
        assert set(case.choice.options.values()) <= set(providers), op
        assert case.choice.default in case.choice.options, op
    if case.eager is not None:
        args = _inputs(op)
        want = case.reference(*args)
        got = case.eager(*args)
        for r, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(r, w, atol=1e-4, rtol=1e-4)

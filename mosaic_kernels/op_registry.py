"""What each op declares next to its function: its benchmark case and its per-shape choice.

Every op module ends with one ``register(BenchCase(...))``. The benchmarks
(``benchmarks/bench_kernels.py``, ``benchmarks/gpu_suite.py``) discover the cases in
:data:`CASES`, and :mod:`mosaic_kernels.configs` measures an op's :class:`Choice` (vendor vs
Triton GEMM, the SDPA kernel) by timing the providers of its case. Nothing else lists the ops.

Canonical shapes: row ops ``(B, L, D)``, GEMM ops ``(M, N, K)`` with ``M`` the rows of ``x``
and ``N`` the rows of the weight, ``attention`` ``(B, L, H, hd)``, ``rms_norm_rope``
``(B, S, H, D, rope)`` (``rope`` 1: cos/sin passed, 0: none).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["CASES", "BenchCase", "Choice", "TritonCase", "attention_bucket", "gemm_bucket", "register"]

Shape = tuple[int, ...]


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _ints(op: str, shape: Sequence[int], names: str) -> Shape:
    if len(shape) != len(names.split(", ")):
        raise ValueError(f"{op}: shape must be ({names}), got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def gemm_bucket(op: str, shape: Sequence[int]) -> str:
    """``"M<pow2>_N<N>_K<K>"``: a GEMM's choice depends on the exact N and K (a stage's widths)
    and on the order of magnitude of M (batch * tokens)."""
    M, N, K = _ints(op, shape, "M, N, K")
    return f"M{min(next_power_of_2(M), 1 << 20)}_N{N}_K{K}"


def attention_bucket(op: str, shape: Sequence[int]) -> str:
    """``"B<pow2>_L<L>_H<H>_hd<hd>"``: the SDPA kernel choice depends on sequence, heads and head_dim."""
    B, L, H, hd = _ints(op, shape, "B, L, H, hd")
    return f"B{next_power_of_2(B)}_L{L}_H{H}_hd{hd}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """A per-shape decision that is not a Triton tile, measured by timing the case's providers.

    Attributes:
        field: the config key the op reads (``{"backend": "vendor"}``).
        options: option value -> name of the provider (in the op's :class:`BenchCase`) that runs it.
        default: the option used until a measurement says otherwise.
        bucket: ``(op, shape) -> str``, the shape part of the key decisions are stored under.
    """

    field: str
    options: Mapping[str, str]
    default: str
    bucket: Callable[[str, Sequence[int]], str]


@dataclasses.dataclass(frozen=True)
class TritonCase:
    """How ``benchmarks/compile_check.py`` compiles an op's Triton kernel at a canonical shape.

    Attributes:
        family: ``"row"`` or ``"gemm"``: which resource rules apply (row kernels must not spill;
            GEMMs must use wgmma on Hopper and have a TMA variant).
        configs: ``(shape, dtype) -> [(source, config)]``: every config the launcher may run
            there (the row settings; every entry of the GEMM autotune list, pointer and TMA).
        launch: ``(shape, dtype, config, alloc)``: the launcher with that config on tensors
            from ``alloc(*sizes)`` (``torch.empty`` in the compile check: no page is touched).
    """

    family: str
    configs: Callable[[Shape, torch.dtype], list[tuple[str, dict[str, Any]]]]
    launch: Callable[[Shape, torch.dtype, dict[str, Any], Callable[..., torch.Tensor]], Any]


def _no_flops(shape: Shape) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """How to benchmark one op.

    Attributes:
        op: the op name (``mosaic_kernels.ops.<op>``).
        make_inputs: ``(shape, dtype, device, generator) -> args`` of the op for a canonical shape
            (random, never all zeros).
        bytes_moved: ``(shape, element_size) -> bytes``: each input read once, each output
            written once (the floor a memory-bound kernel is measured against).
        reference: the plain-torch definition (``reference.<op>_ref``), with the op's signature.
        providers: ``() -> {name: callable}`` with the op's signature (``reference`` is added by
            the benchmarks); built on demand, since some compile lazily.
        model_shapes: ``batch -> [canonical shapes]`` the op runs in its model at that batch
            (DiT-XL/2 for the DiT ops, SDXL for its ops).
        tiny_shape: a small canonical shape for CPU smoke runs (the interpreter is slow).
        flops: ``shape -> FLOPs`` (0 for memory-bound ops).
        eager: the op in plain torch in the input dtype (what a framework runs unfused), or None.
        choice: the per-shape :class:`Choice`, or None when nothing is decided per shape.
        triton: the :class:`TritonCase` of the op's Triton kernel, or None (no Triton kernel).
    """

    op: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device, torch.Generator], tuple]
    bytes_moved: Callable[[Shape, int], int]
    reference: Callable[..., Any]
    providers: Callable[[], dict[str, Callable[..., Any]]]
    model_shapes: Callable[[int], list[Shape]]
    tiny_shape: Shape
    flops: Callable[[Shape], int] = _no_flops
    eager: Callable[..., Any] | None = None
    choice: Choice | None = None
    triton: TritonCase | None = None


_cases: dict[str, BenchCase] = {}
#: op name -> its :class:`BenchCase`, in registration order (read-only view).
CASES: Mapping[str, BenchCase] = types.MappingProxyType(_cases)


def register(case: BenchCase) -> BenchCase:
    """Add an op's case to :data:`CASES` (once per op)."""
    if case.op in _cases:
        raise ValueError(f"op {case.op!r} is registered twice")
    _cases[case.op] = case
    return case


def random_maker(device: torch.device | str, dtype: torch.dtype, generator: torch.Generator):
    """``rnd(*shape, scale=1.0)``: normal values from ``generator``, drawn in fp32, cast to ``dtype``."""

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    return rnd


def eager_providers(eager: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """``torch_eager`` and ``torch_compile`` (``dynamic=False``) of a plain-torch composition."""
    return {"torch_eager": eager, "torch_compile": torch.compile(eager, dynamic=False)}


def row_triton_case(op: str, launch: Callable[..., Any]) -> TritonCase:
    """A row op's :class:`TritonCase`: its launch settings at the shape's D and dtype."""

    def configs(shape: Shape, dtype: torch.dtype) -> list[tuple[str, dict[str, Any]]]:
        from .triton.settings import row_settings

        return [("row_settings", row_settings(op, shape[-1], dtype))]

    return TritonCase(family="row", configs=configs, launch=launch)

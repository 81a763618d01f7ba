"""The backward of every mosaic custom op: a vector-Jacobian product through the reference math.

No op has a backward kernel. :func:`register_reference_backward` registers, with the public
``torch.library.register_autograd`` (torch >= 2.4), a formula that saves the op's inputs and, in
backward, recomputes the op's ``mosaic_kernels.reference`` definition under ``torch.enable_grad()``
on detached copies of them, then calls ``torch.autograd.grad`` with the incoming output grads.
So whatever backend ran the forward (compiled CUDA, Triton, torch), the gradients are those of
the fp32 reference: every input computed in fp32, each gradient cast back to its input's dtype
(a bf16 weight gets a bf16 grad, an fp32 modulation vector of a bf16 ``x`` an fp32 one).

Gradients go to every floating tensor input that requires grad (activations, weights, biases,
modulation vectors); ``None`` for the others, for absent optional tensors and for non-tensor
arguments (``eps``). Inputs that do not require grad (a frozen base weight under LoRA) are
recomputed without grad, so their gradient GEMM is never run. An output whose grad is ``None``
(unused) contributes nothing.

Costs: the backward recomputes the forward once (for a GEMM op one extra GEMM) and runs it in
fp32 like the reference. Double backward is not supported: the recomputation is detached from
the forward's graph, so the returned gradients do not require grad.

The formula is plain torch ops, so ``torch.compile(fullgraph=True)`` traces it (AOTAutograd
records the recomputation and its autograd into the backward graph) without a graph break.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["register_reference_backward"]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """Save the tensor inputs (``None`` in place of absent optional tensors) and the others."""
    is_tensor = tuple(isinstance(a, torch.Tensor) for a in inputs)
    ctx.save_for_backward(*(a if t else None for a, t in zip(inputs, is_tensor)))
    ctx.mosaic_is_tensor = is_tensor
    ctx.mosaic_constants = tuple(None if t else a for a, t in zip(inputs, is_tensor))


def reference_vjp(reference: Callable[..., Any], args: tuple[Any, ...], needs_grad: tuple[bool, ...],
                  grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """``grads`` pulled back through ``reference(*args)`` to the tensor args flagged in `needs_grad`.

    Args:
        reference: the op's plain-torch definition (one tensor or a tuple of tensors out).
        args: the op's inputs, all of them (tensors, ``None`` for absent optional tensors, scalars).
        needs_grad: per arg, whether its gradient is wanted.
        grads: per output of `reference`, the incoming gradient or ``None``.

    Returns:
        One entry per arg: its gradient (its own dtype and shape), or ``None``.
    """
    wanted = [i for i, a in enumerate(args)
              if needs_grad[i] and isinstance(a, torch.Tensor) and a.is_floating_point()]
    result: list[torch.Tensor | None] = [None] * len(args)
    if not wanted or all(g is None for g in grads):
        return tuple(result)
    with torch.enable_grad():
        leaves = list(args)
        for i in wanted:
            leaves[i] = args[i].detach().requires_grad_(True)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in wanted:
                leaves[i] = a.detach()
        outputs = reference(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if len(outputs) != len(grads):
            raise RuntimeError(f"{getattr(reference, '__name__', reference)}: {len(outputs)} outputs, "
                               f"{len(grads)} output grads")
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if not pairs:
            return tuple(result)
        got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted],
                                  grad_outputs=[g for _, g in pairs], allow_unused=True)
    for i, g in zip(wanted, got):
        result[i] = g
    return tuple(result)


def _backward_of(reference: Callable[..., Any]) -> Callable[..., tuple[torch.Tensor | None, ...]]:
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        args = tuple(s if t else c for s, t, c in zip(saved, ctx.mosaic_is_tensor, ctx.mosaic_constants))
        # torch.library passes needs_input_grad for the inputs the call passed; arguments left at
        # their default (linear_geglu's gate_weight=None) are at the end and need no grad.
        needs = tuple(ctx.needs_input_grad)[:len(args)]
        needs = needs + (False,) * (len(args) - len(needs))
        return reference_vjp(reference, args, needs, grads)

    backward.__name__ = f"{getattr(reference, '__name__', 'reference')}_backward"
    return backward


def register_reference_backward(op: Any, reference: Callable[..., Any]) -> None:
    """Give the custom op `op` the backward of `reference` (same positional arguments and outputs).

    Args:
        op: the ``torch.library.custom_op`` object (or its ``"mosaic::<op>"`` name).
        reference: its plain-torch definition in :mod:`mosaic_kernels.reference`.
    """
    torch.library.register_autograd(op, _backward_of(reference), setup_context=_setup_context)

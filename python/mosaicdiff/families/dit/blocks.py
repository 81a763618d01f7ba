"""The compact DiT block and the shared conditioning, both running through `mosaic_kernels.ops`.

A `CompactDiTBlock` is one pruned DiT block (adaLN-Zero `BasicTransformerBlock` math) whose
attention and MLP are physically smaller dense matrices (a `CompactBlockWeights`). Everything
that pruning does not touch -- the timestep/class embedder and the adaLN modulation linears of
all blocks -- lives once in `SharedConditioning`, which computes, once per forward:

1. the conditioning embedding (timestep + class), once when the blocks' embedders are identical
   (as in converted DiT-XL/2 checkpoints), else once per block;
2. SiLU of it;
3. the six modulation vectors of *every* block with a single batched GEMM over the
   concatenated ``(L*6C, C)`` adaLN weight.

This module knows nothing about diffusers classes; it only receives modules and tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mosaicdiff.core.gemm import FP8GemmMixin
from mosaicdiff.core.stages import frozen
from mosaicdiff.families.dit.weights import WEIGHT_FIELDS, CompactBlockWeights, compact_block_shapes

logger = logging.getLogger(__name__)

__all__ = ["CompactDiTBlock", "MOD_NAMES", "SharedConditioning", "SharedSkeleton", "empty_block_weights"]

#: Order of the six adaLN-Zero modulation vectors of a block (as diffusers' AdaLayerNormZero).
MOD_NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def _ops():
    """Import the kernel ops lazily, so that importing this module never needs them."""
    from mosaic_kernels import ops

    return ops


class CompactDiTBlock(FP8GemmMixin, nn.Module):
    r"""One pruned adaLN-Zero DiT block, computed with the fused `mosaic_kernels.ops`.

    The math is that of diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``
    (self-attention only, tanh-GELU MLP), restricted to the kept heads and MLP channels::

        x      = LN(h) * (1 + scale_msa) + shift_msa                # ln_modulate
        a      = attention(x @ Wqkv.T + bqkv)                       # kept heads only
        h, x2  = h + gate_msa * (a @ Wproj.T + bproj), LN(h)*(1+scale_mlp)+shift_mlp
        f      = gelu_tanh(x2 @ Wfc1.T + bfc1)                      # linear_gelu
        h      = h + gate_mlp * (f @ Wfc2.T + bfc2)                 # linear_gated_residual

    Inside a stage the runtime chains blocks with `forward_normed`: the last line and the next
    block's first norm become one ``gated_residual_ln_modulate`` after a plain fc2 GEMM.

    After `mosaicdiff.quantize` (``"fp8"``) the four GEMM weights are ``float8_e4m3fn`` with a
    per-output-channel fp32 scale beside each (``<name>_weight_scale``, also a frozen parameter),
    and the GEMMs run through ``mosaic_kernels.fp8_gemm`` with the same fused epilogues, in
    `fp8_mode` (``"weight_only"`` or ``"per_token"`` activations).

    The weights are frozen parameters (``requires_grad=False``); the kept-index tensors are
    plain CPU attributes (metadata, never moved by ``.to()``).

    Args:
        weights (`CompactBlockWeights`): the compact weights. The tensors are used as given
            (no copy); ``.to()`` on the module converts them as usual.
        head_dim (`int`): channels per attention head (``hd``).
        eps (`float`, *optional*, defaults to 1e-6): epsilon of the attention-branch LayerNorm
            (diffusers' ``AdaLayerNormZero`` uses 1e-6).
        mlp_eps (`float`, *optional*): epsilon of the MLP-branch LayerNorm (diffusers' ``norm3``,
            the model's ``norm_eps``); defaults to ``eps``.

    Raises:
        ValueError: if the weight shapes are inconsistent with each other or with ``head_dim``.
    """

    def __init__(
        self,
        weights: CompactBlockWeights,
        head_dim: int,
        eps: float = 1e-6,
        mlp_eps: float | None = None,
    ):
        super().__init__()
        _check_block_weights(weights, head_dim)
        self.head_dim = int(head_dim)
        self.eps = float(eps)
        self.mlp_eps = float(eps if mlp_eps is None else mlp_eps)
        self.kept_heads = weights.kept_heads.detach().to("cpu", torch.int64)
        self.kept_channels = weights.kept_channels.detach().to("cpu", torch.int64)
        for name in WEIGHT_FIELDS:
            setattr(self, name, frozen(getattr(weights, name)))

    @property
    def num_heads(self) -> int:
        """Number of kept attention heads."""
        return int(self.kept_heads.numel())

    @property
    def mlp_width(self) -> int:
        """Number of kept MLP channels."""
        return int(self.kept_channels.numel())

    @property
    def width(self) -> int:
        """Model width C."""
        return int(self.proj_bias.shape[0])

    #: How the qkv GEMM's output is laid out for `mosaic_kernels.ops.attention` (``[q | k | v]``); fc1
    #: has one row per kept channel in `kept_channels` order.
    qkv_layout = "qkv"
    #: The GEMM weights `mosaicdiff.quantize` stores as float8 (each with a ``<name>_scale``).
    fp8_weights = ("qkv_weight", "proj_weight", "fc1_weight", "fc2_weight")

    def weights(self) -> CompactBlockWeights:
        """The block's current tensors as a `CompactBlockWeights` (no copy).

        Returns:
            `CompactBlockWeights` whose float tensors are the module's parameters' data.
        """
        kw = {name: getattr(self, name).detach() for name in WEIGHT_FIELDS}
        return CompactBlockWeights(kept_heads=self.kept_heads, kept_channels=self.kept_channels, **kw)

    def forward(self, h: torch.Tensor, mod: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run the block on its own (its first norm included, the residual stream out).

        Args:
            h (`torch.Tensor` of shape `(B, L, C)`): the residual stream.
            mod (sequence of 6 `torch.Tensor` of shape `(B, C)`): this block's modulation
                vectors in `MOD_NAMES` order.

        Returns:
            `torch.Tensor` of shape `(B, L, C)`: the updated residual stream.
        """
        h = h.contiguous()  # no-op for the runtime's own activations
        x = _ops().ln_modulate(h, mod[0], mod[1], self.eps) if self.num_heads > 0 else None
        return self.forward_normed(h, x, mod)[0]

    def forward_normed(
        self,
        h: torch.Tensor,
        x: torch.Tensor | None,
        mod: Sequence[torch.Tensor],
        next_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block on an already normalised input, optionally fusing the *next* norm.

        Chained blocks pass each other the modulated norm, so the residual stream makes one
        pass per block boundary: fc2's gated residual and the next block's LayerNorm +
        modulate run as one ``gated_residual_ln_modulate`` (instead of the gated-residual
        epilogue, then a separate ``ln_modulate`` re-reading the stream).

        Args:
            h (`torch.Tensor` of shape `(B, L, C)`, contiguous): the residual stream.
            x (`torch.Tensor` of shape `(B, L, C)` or None): ``LN(h) * (1 + scale_msa) +
                shift_msa``; unused (may be None) when every head is pruned.
            mod (sequence of 6 `torch.Tensor` of shape `(B, C)`): this block's modulation.
            next_norm (`(shift, scale, eps)`, *optional*): the modulation of the norm that
                reads this block's output (the next block's attention norm, or the final
                layer's); None returns no normed output.

        Returns:
            `(h, x_next)`: the updated residual stream and, with ``next_norm``, its modulated
            norm (else None).
        """
        ops = _ops()
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        # 1. Attention branch on the kept heads.
        if self.num_heads > 0:
            qkv = self.producer_gemm("qkv", x)
            a = ops.attention(qkv, self.num_heads, layout=self.qkv_layout)
            y = self.own_gemm("proj", a)
        else:  # every head pruned: the branch is its (compensated) bias
            y = self._bias_rows(self.proj_bias, h)
        # 2. Gated residual fused with the MLP's norm + modulate.
        h, x2 = ops.gated_residual_ln_modulate(h, gate_msa, y, shift_mlp, scale_mlp, self.mlp_eps)
        # 3. MLP on the kept channels.
        f = self.producer_gemm("fc1", x2, "gelu_tanh") if self.mlp_width > 0 else None
        if next_norm is not None:  # fc2, then its gated residual fused with the next norm
            y = self.own_gemm("fc2", f) if f is not None else self._bias_rows(self.fc2_bias, h)
            shift, scale, eps = next_norm
            return ops.gated_residual_ln_modulate(h, gate_mlp, y, shift, scale, eps)
        if f is not None:  # fc2 with the gated residual in its epilogue
            return self.own_gemm("fc2", f, "gated_residual", gate=gate_mlp, res=h), None
        return ops.gated_residual(h, gate_mlp, self._bias_rows(self.fc2_bias, h)), None

    @staticmethod
    def _bias_rows(bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """A fully pruned branch's output: its (compensated) bias on every token."""
        return bias.to(h.dtype).expand_as(h).contiguous()

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, mlp_width={self.mlp_width}, "
            f"width={self.width}, eps={self.eps:g}, mlp_eps={self.mlp_eps:g}"
        )


def _check_block_weights(w: CompactBlockWeights, head_dim: int) -> None:
    """Check the shapes of one block's compact weights.

    Raises:
        ValueError: naming the field, the expected and the actual shape.
    """
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    h, f = int(w.kept_heads.numel()), int(w.kept_channels.numel())
    c = int(w.proj_bias.shape[0]) if w.proj_bias.dim() == 1 else -1
    expected = compact_block_shapes(h, f, head_dim, c)
    for name, shape in expected.items():
        actual = tuple(getattr(w, name).shape)
        if actual != shape:
            raise ValueError(
                f"CompactBlockWeights.{name}: expected shape {shape} for {h} kept heads of "
                f"head_dim {head_dim}, {f} kept channels and width {c}, got {actual}"
            )
        if not getattr(w, name).is_floating_point():
            raise TypeError(f"CompactBlockWeights.{name} must be floating point, got {getattr(w, name).dtype}")
    for name in ("kept_heads", "kept_channels"):
        idx = getattr(w, name)
        if idx.dim() != 1 or idx.is_floating_point():
            raise TypeError(
                f"CompactBlockWeights.{name} must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}"
            )


def empty_block_weights(kept_heads, kept_channels, head_dim: int, width: int) -> CompactBlockWeights:
    """Uninitialised float32 CPU weights of the shapes a block with these kept indices has.

    The skeleton a saved mosaic is loaded into: the pages are only touched when the weights are
    assigned, so building the empty model costs no memory traffic.
    """
    heads = torch.as_tensor(kept_heads, dtype=torch.int64).reshape(-1)
    channels = torch.as_tensor(kept_channels, dtype=torch.int64).reshape(-1)
    shapes = compact_block_shapes(heads.numel(), channels.numel(), head_dim, width)
    return CompactBlockWeights(kept_heads=heads, kept_channels=channels,
                               **{name: torch.empty(shape) for name, shape in shapes.items()})


class SharedConditioning(nn.Module):
    r"""Timestep/class embedding and the adaLN modulation of all blocks, computed once per forward.

    Parameters:
        embedders (`nn.Module` or sequence of `nn.Module`): one embedder shared by all blocks
            (the blocks' embedders are identical), or one per block. Each is called as
            ``emb(timestep, class_labels, hidden_dtype=...) -> (B, C)`` (diffusers'
            ``CombinedTimestepLabelEmbeddings``). The first one also conditions the final layer.
        mod_weight (`torch.Tensor` of shape `(L*6C, C)`): every block's adaLN linear weight,
            concatenated block after block (see `from_blocks`); stored as a frozen parameter.
        mod_bias (`torch.Tensor` of shape `(L*6C,)`): the matching biases.
        num_layers (`int`): L.

    Raises:
        ValueError: if the shapes do not match ``num_layers`` or the number of per-block
            embedders differs from the number of blocks.
    """

    def __init__(
        self,
        embedders: nn.Module | Sequence[nn.Module],
        mod_weight: torch.Tensor,
        mod_bias: torch.Tensor,
        num_layers: int,
    ):
        super().__init__()
        L = int(num_layers)
        c = int(mod_weight.shape[1]) if mod_weight.dim() == 2 else -1
        if L <= 0 or tuple(mod_weight.shape) != (L * 6 * c, c) or tuple(mod_bias.shape) != (L * 6 * c,):
            raise ValueError(
                f"adaLN matrix of {L} blocks must be ({L * 6 * c}, {c}) + ({L * 6 * c},), got "
                f"{tuple(mod_weight.shape)} + {tuple(mod_bias.shape)}"
            )
        self.num_layers = L
        self.width = c
        if isinstance(embedders, nn.Module) and not isinstance(embedders, nn.ModuleList):
            embedders = [embedders]
        embedders = list(embedders)
        if len(embedders) not in (1, L):
            raise ValueError(f"need 1 shared embedder or one per block ({L}), got {len(embedders)}")
        self.embedders = nn.ModuleList(embedders)
        self.mod_weight = frozen(mod_weight)
        self.mod_bias = frozen(mod_bias)

    @classmethod
    def from_blocks(
        cls,
        embedders: nn.Module | Sequence[nn.Module],
        mod_weights: Sequence[torch.Tensor],
        mod_biases: Sequence[torch.Tensor],
    ) -> SharedConditioning:
        """Concatenate each block's adaLN linear ``(6C, C)`` into the batched ``(L*6C, C)`` matrix.

        Args:
            embedders: as in the constructor.
            mod_weights (sequence of `torch.Tensor` of shape `(6C, C)`): per-block weights.
            mod_biases (sequence of `torch.Tensor` of shape `(6C,)`): per-block biases.

        Returns:
            `SharedConditioning` owning new concatenated tensors.

        Raises:
            ValueError: if a block's weight or bias has the wrong shape.
        """
        if len(mod_weights) == 0 or len(mod_weights) != len(mod_biases):
            raise ValueError(
                f"need one adaLN weight and bias per block, got {len(mod_weights)} weights and "
                f"{len(mod_biases)} biases"
            )
        c = int(mod_weights[0].shape[1])
        for i, (w, b) in enumerate(zip(mod_weights, mod_biases)):
            if tuple(w.shape) != (6 * c, c) or tuple(b.shape) != (6 * c,):
                raise ValueError(
                    f"block {i}: adaLN linear must be ({6 * c}, {c}) + ({6 * c},), got "
                    f"{tuple(w.shape)} + {tuple(b.shape)}"
                )
        weight = torch.cat([w.detach() for w in mod_weights], dim=0)
        bias = torch.cat([b.detach() for b in mod_biases], dim=0)
        return cls(embedders, weight, bias, num_layers=len(mod_weights))

    @property
    def shared_embedder(self) -> bool:
        """True when one embedder serves every block."""
        return len(self.embedders) == 1

    def forward(
        self, timestep: torch.Tensor, class_labels: torch.Tensor, hidden_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the conditioning of the final layer and the modulation of every block.

        Args:
            timestep (`torch.Tensor` of shape `(B,)`): the timesteps.
            class_labels (`torch.LongTensor` of shape `(B,)`): the class labels.
            hidden_dtype (`torch.dtype`): dtype of the hidden states (the embedder casts the
                sinusoidal projection to it, as in diffusers).

        Returns:
            `(emb, mods)`: ``emb`` (B, C) is the first embedder's output (conditions the final
            layer); ``mods`` (L, 6, B, C) is contiguous, ``mods[l][k]`` being block ``l``'s
            ``MOD_NAMES[k]`` vector.
        """
        L, C = self.num_layers, self.width
        if self.shared_embedder:
            emb = self.embedders[0](timestep, class_labels, hidden_dtype=hidden_dtype)
            m = F.linear(F.silu(emb), self.mod_weight, self.mod_bias)  # (B, L*6C): one GEMM
            mods = m.view(-1, L, 6, C).permute(1, 2, 0, 3).contiguous()
            return emb, mods
        embs = torch.stack([e(timestep, class_labels, hidden_dtype=hidden_dtype) for e in self.embedders])
        w = self.mod_weight.view(L, 6 * C, C).transpose(1, 2)  # (L, C, 6C)
        m = torch.baddbmm(self.mod_bias.view(L, 1, 6 * C), F.silu(embs), w)  # (L, B, 6C): one batched GEMM
        mods = m.view(L, -1, 6, C).permute(0, 2, 1, 3).contiguous()
        return embs[0], mods

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, width={self.width}, shared_embedder={self.shared_embedder}"


class SharedSkeleton(nn.Module):
    r"""The un-pruned parameters of a DiT, stored once and shared by every stage.

    Parameters:
        pos_embed (`nn.Module`): diffusers' ``PatchEmbed`` (patchify conv + sin-cos positions).
        conditioning (`SharedConditioning`): embedder(s) and the batched adaLN matrix.
        proj_out_1 (`nn.Linear`): final-layer modulation linear ``C -> 2C``.
        proj_out_2 (`nn.Linear`): final projection ``C -> p*p*out_channels``.
        norm_out_eps (`float`): epsilon of the final LayerNorm (no affine).
    """

    def __init__(self, pos_embed: nn.Module, conditioning: SharedConditioning, proj_out_1: nn.Linear,
                 proj_out_2: nn.Linear, norm_out_eps: float = 1e-6):
        super().__init__()
        self.pos_embed = pos_embed
        self.conditioning = conditioning
        self.proj_out_1 = proj_out_1
        self.proj_out_2 = proj_out_2
        self.norm_out_eps = float(norm_out_eps)
        for p in self.parameters():
            p.requires_grad_(False)

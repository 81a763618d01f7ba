r"""The DiT adapter: diffusers' ``DiTTransformer2DModel`` as the method and the runtime see it.

A DiT block is a ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``; its prunable
units are the heads of ``attn1`` and the channels of the tanh-GELU MLP::

    q, k, v = attn1.to_q, attn1.to_k, attn1.to_v      # producers of the heads (sliced)
    proj    = attn1.to_out[0]                          # consumer of the heads (compensated)
    fc1     = ff.net[0].proj                           # producer of the MLP channels (sliced)
    fc2     = ff.net[2]                                # consumer of the MLP channels (compensated)

`DiTAdapter` hands these to the method as two `PrunableGroup` ("proj": heads, "fc2": channels),
runs the model on calibration inputs with class labels, assembles `CompactBlockWeights` and
builds the shared skeleton (`skeleton_from_dense`, `skeleton_from_config`) of `MosaicDiT`.
diffusers is imported only where a function needs its classes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, PrunedGroup, linear_bias, unwrap_model
from mosaicdiff.families.dit.blocks import SharedConditioning, SharedSkeleton
from mosaicdiff.families.dit.weights import CompactBlockWeights
from mosaicdiff.method import compact
from mosaicdiff.method.calibrate import check_class_ids

logger = logging.getLogger(__name__)

__all__ = [
    "DIT",
    "DIT_CONFIG_KEYS",
    "DiTAdapter",
    "LINEAR_NAMES",
    "block_linears",
    "check_block_math",
    "dense_block_weights",
    "embedders_identical",
    "model_head_dim",
    "model_num_heads",
    "prune_block",
    "run_dit",
    "skeleton_from_config",
    "skeleton_from_dense",
    "transformer_blocks",
    "unwrap_model",
    "validate_dit",
]

#: The ``DiTTransformer2DModel`` config keys that describe its architecture (a mosaic repeats them).
DIT_CONFIG_KEYS = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
    "norm_num_groups", "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm",
    "upcast_attention", "norm_type", "norm_elementwise_affine", "norm_eps",
)
#: Keys of `block_linears`, in the order producers / consumers appear in a block.
LINEAR_NAMES = ("q", "k", "v", "proj", "fc1", "fc2")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """Returns the model's ``transformer_blocks`` list (after `validate_dit`)."""
    return unwrap_model(model).transformer_blocks


def validate_dit(model: nn.Module) -> None:
    """Checks that `model` is a DiT the pruner and the compact runtime understand.

    Accepted: a ``DiTTransformer2DModel``-like module whose ``transformer_blocks`` are diffusers
    ``BasicTransformerBlock`` with ``norm_type == "ada_norm_zero"``, self-attention only and a
    tanh-GELU MLP (what ``mosaicdiff.families.dit.blocks.CompactDiTBlock`` computes).

    Args:
        model (`nn.Module`): the candidate model (a ``torch.compile`` wrapper is looked through).

    Raises:
        ValueError: naming the class found (model or block) and what was expected.
    """
    from diffusers.models.attention import BasicTransformerBlock

    inner = unwrap_model(model)
    name = type(inner).__name__
    blocks = getattr(inner, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            "expected a DiTTransformer2DModel-like model with a non-empty `transformer_blocks` "
            f"ModuleList, got {name}"
        )
    config = getattr(inner, "config", None)
    for key in ("num_attention_heads", "attention_head_dim"):
        if config is None or key not in config:
            raise ValueError(f"expected a DiTTransformer2DModel-like model with config.{key}, got {name}")
    for i, block in enumerate(blocks):
        bname = type(block).__name__
        if not isinstance(block, BasicTransformerBlock):
            raise ValueError(
                f"expected DiT blocks of class BasicTransformerBlock, got {bname} at "
                f"transformer_blocks[{i}] of {name}"
            )
        if block.norm_type != "ada_norm_zero":
            raise ValueError(
                f"expected BasicTransformerBlock with norm_type='ada_norm_zero' (DiT), got "
                f"norm_type={block.norm_type!r} at transformer_blocks[{i}] of {name}"
            )
        if getattr(block, "attn2", None) is not None or block.only_cross_attention:
            raise ValueError(
                f"expected self-attention-only DiT blocks, got cross-attention at "
                f"transformer_blocks[{i}] of {name}"
            )
        act = block.ff.net[0]
        if getattr(act, "approximate", None) != "tanh":
            raise ValueError(
                f"expected a tanh-GELU MLP (activation_fn='gelu-approximate'), got "
                f"{type(act).__name__}(approximate={getattr(act, 'approximate', None)!r}) at "
                f"transformer_blocks[{i}] of {name}"
            )


def check_block_math(dense: nn.Module) -> None:
    """Reject DiT variants whose block math `mosaicdiff.families.dit.blocks.CompactDiTBlock` does not reproduce.

    Raises:
        NotImplementedError: naming the block and the unsupported feature.
    """
    head_dim = model_head_dim(dense)
    for i, block in enumerate(transformer_blocks(dense)):
        attn = block.attn1
        problems = []
        if getattr(block.norm3, "weight", None) is not None or getattr(block.norm3, "bias", None) is not None:
            problems.append("affine norm3 (norm_elementwise_affine=True)")
        if getattr(block, "pos_embed", None) is not None:
            problems.append("per-block positional embeddings")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            problems.append("qk-norm")
        if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
            problems.append("attention residual/rescale")
        if not math.isclose(float(getattr(attn, "scale", head_dim ** -0.5)), head_dim ** -0.5, rel_tol=1e-6):
            problems.append(f"attention scale {attn.scale} != head_dim**-0.5")
        if problems:
            raise NotImplementedError(
                f"MosaicDiT: transformer_blocks[{i}] uses {', '.join(problems)}, which the compact "
                f"block does not implement"
            )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Returns the six prunable linears of one DiT block.

    Args:
        block (`BasicTransformerBlock`): an adaLN-Zero DiT block.

    Returns:
        `dict[str, nn.Linear]` with keys ``q, k, v`` (``attn1.to_q/k/v``), ``proj``
        (``attn1.to_out[0]``), ``fc1`` (``ff.net[0].proj``) and ``fc2`` (``ff.net[2]``).
    """
    attn, ff = block.attn1, block.ff
    return {
        "q": attn.to_q,
        "k": attn.to_k,
        "v": attn.to_v,
        "proj": attn.to_out[0],
        "fc1": ff.net[0].proj,
        "fc2": ff.net[2],
    }


def dense_block_weights(block: nn.Module, num_heads: int) -> CompactBlockWeights:
    """The weights of an unpruned block in the compact layout (nothing removed).

    Args:
        block (`BasicTransformerBlock`): an adaLN-Zero DiT block.
        num_heads (`int`): its number of attention heads.

    Returns:
        `CompactBlockWeights` with every head and channel kept; ``qkv_weight`` is the row
        concatenation ``[to_q; to_k; to_v]``. Tensors are detached copies.
    """
    lin = block_linears(block)
    width = lin["fc1"].out_features
    device = lin["q"].weight.device
    return CompactBlockWeights(
        kept_heads=torch.arange(num_heads, device=device),
        kept_channels=torch.arange(width, device=device),
        qkv_weight=torch.cat([lin[n].weight.detach() for n in "qkv"], 0).clone(),
        qkv_bias=torch.cat([linear_bias(lin[n]) for n in "qkv"], 0).clone(),
        proj_weight=lin["proj"].weight.detach().clone(),
        proj_bias=linear_bias(lin["proj"]).clone(),
        fc1_weight=lin["fc1"].weight.detach().clone(),
        fc1_bias=linear_bias(lin["fc1"]).clone(),
        fc2_weight=lin["fc2"].weight.detach().clone(),
        fc2_bias=linear_bias(lin["fc2"]).clone(),
    )


def block_groups(lin: Mapping[str, nn.Linear], num_heads: int) -> dict[str, PrunableGroup]:
    """The two prunable groups of a DiT block: ``"proj"`` (heads) and ``"fc2"`` (MLP channels).

    Raises:
        ValueError: on missing linears or shapes that do not fit together or `num_heads`.
    """
    missing = [k for k in LINEAR_NAMES if k not in lin]
    if missing:
        raise ValueError(f"block_linears is missing {missing}")
    inner = lin["proj"].in_features
    if int(num_heads) != num_heads or num_heads < 1 or inner % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of proj.in_features={inner}, got {num_heads}")
    for n in "qkv":
        if lin[n].out_features != inner:
            raise ValueError(f"{n}.out_features={lin[n].out_features} != proj.in_features={inner}")
    width = lin["fc2"].in_features
    if lin["fc1"].out_features != width:
        raise ValueError(f"fc1.out_features={lin['fc1'].out_features} != fc2.in_features={width}")
    return {
        "proj": PrunableGroup("heads", lin["proj"], (lin["q"], lin["k"], lin["v"]), inner // int(num_heads)),
        "fc2": PrunableGroup("channels", lin["fc2"], (lin["fc1"],), 1),
    }


def compact_from_groups(pruned: Mapping[str, PrunedGroup]) -> CompactBlockWeights:
    """Assemble `CompactBlockWeights` from the pruned ``"proj"`` and ``"fc2"`` groups."""
    heads, mlp = pruned["proj"], pruned["fc2"]
    return CompactBlockWeights(
        kept_heads=heads.kept,
        kept_channels=mlp.kept,
        qkv_weight=torch.cat(heads.producer_weights, 0),
        qkv_bias=torch.cat(heads.producer_biases, 0),
        proj_weight=heads.consumer_weight,
        proj_bias=heads.consumer_bias,
        fc1_weight=mlp.producer_weights[0],
        fc1_bias=mlp.producer_biases[0],
        fc2_weight=mlp.consumer_weight,
        fc2_bias=mlp.consumer_bias,
    )


def prune_block(block_linears: Mapping[str, nn.Linear], hessians: Mapping[str, torch.Tensor] | None,
                num_heads: int, head_sparsity: float, mlp_sparsity: float, method: str = "obs",
                align: int | None = 64, generator: torch.Generator | None = None,
                keep_within: Mapping[str, torch.Tensor] | None = None, **obs_kwargs) -> CompactBlockWeights:
    """Prunes one DiT block's heads and MLP channels into a `CompactBlockWeights`.

    Args:
        block_linears (`Mapping[str, nn.Linear]`): ``q, k, v, proj, fc1, fc2`` as from `block_linears`.
        hessians (`Mapping[str, torch.Tensor]`, *optional*): ``proj`` and ``fc2`` input Hessians
            (as from `mosaicdiff.method.calibrate.collect_hessians`); needed for ``"obs"``.
        num_heads (`int`): heads of the block (``proj.in_features`` must be divisible by it).
        head_sparsity (`float`): fraction of heads to remove, in [0, 1); rounded to the nearest
            head count; at least one head is always kept.
        mlp_sparsity (`float`): fraction of MLP channels to remove, in [0, 1); the kept width is
            rounded to a multiple of `align` (see `mosaicdiff.method.compact.align_width`).
        method (`str`, *optional*, defaults to ``"obs"``): see `mosaicdiff.method.compact.prune_group`.
        align (`int`, *optional*, defaults to 64): MLP width alignment; None disables it.
        generator (`torch.Generator`, *optional*): for ``"random"``.
        keep_within (`Mapping[str, torch.Tensor]`, *optional*): ``proj`` (heads) and ``fc2``
            (channels) unit sets the kept units are chosen from (`mosaicdiff.method.compact.prune_group`).
        **obs_kwargs: passed to `mosaicdiff.method.obs.prune_columns`.

    Returns:
        `CompactBlockWeights` in the dtype and device of the block's weights.

    Raises:
        ValueError: on an unknown method, bad sparsities, a sparsity that removes every head,
            missing Hessians or inconsistent shapes.
    """
    if method not in compact.METHODS:
        raise ValueError(f"method must be one of {compact.METHODS}, got {method!r}")
    groups = block_groups(block_linears, num_heads)
    pruned = compact.prune_groups(groups, hessians, {"proj": head_sparsity, "fc2": mlp_sparsity}, method,
                                  align, generator, keep_within=keep_within, **obs_kwargs)
    return compact_from_groups(pruned)


def model_head_dim(model: nn.Module) -> int:
    """``config.attention_head_dim`` of a DiT (72 for DiT-XL/2)."""
    return int(unwrap_model(model).config.attention_head_dim)


def model_num_heads(model: nn.Module) -> int:
    """``config.num_attention_heads`` of a DiT (16 for DiT-XL/2)."""
    return int(unwrap_model(model).config.num_attention_heads)


def embedders_identical(model: nn.Module) -> bool:
    """Whether every block's ``norm1.emb`` (timestep + class embedder) has identical weights.

    Converted DiT checkpoints copy one embedder into all blocks; then the conditioning can be
    computed once per forward instead of once per block.
    """
    blocks = transformer_blocks(model)
    ref = blocks[0].norm1.emb.state_dict()
    for block in blocks[1:]:
        other = block.norm1.emb.state_dict()
        if other.keys() != ref.keys():
            return False
        for key, value in ref.items():
            if other[key].shape != value.shape or not torch.equal(other[key], value):
                return False
    return True


def run_dit(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One forward of a diffusers DiT: ``model(x, timestep=t, class_labels=labels).sample``."""
    return model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def skeleton_from_dense(dense: nn.Module) -> SharedSkeleton:
    """Copy the un-pruned modules of a dense DiT into a `SharedSkeleton` (one embedder when identical)."""
    inner = unwrap_model(dense)
    blocks = list(inner.transformer_blocks)
    if embedders_identical(inner):
        embedders: list[nn.Module] = [copy.deepcopy(blocks[0].norm1.emb)]
    else:
        embedders = [copy.deepcopy(b.norm1.emb) for b in blocks]
    conditioning = SharedConditioning.from_blocks(
        embedders, [b.norm1.linear.weight for b in blocks], [b.norm1.linear.bias for b in blocks],
    )
    return SharedSkeleton(copy.deepcopy(inner.pos_embed), conditioning, copy.deepcopy(inner.proj_out_1),
                          copy.deepcopy(inner.proj_out_2), inner.norm_out.eps)


def skeleton_from_config(config: Mapping[str, Any], shared_embedder: bool) -> tuple[SharedSkeleton, dict]:
    """An (uninitialised) skeleton and the block facts of a DiT described by its diffusers config.

    The diffusers model is instantiated with a single block (under a forked RNG, so the caller's
    random state is untouched) to obtain exactly diffusers' patch embedding and embedder modules
    and the block's widths and epsilons.

    Returns:
        `(skeleton, facts)`: the skeleton in float32 on CPU with an uninitialised adaLN matrix;
        ``facts`` holds ``num_heads``, ``head_dim``, ``width``, ``mlp_hidden``, ``attn_norm_eps``
        and ``mlp_norm_eps``.
    """
    from diffusers import DiTTransformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    layers = int(cfg["num_layers"])
    with torch.random.fork_rng(devices=[]):
        dit = DiTTransformer2DModel.from_config({**cfg, "num_layers": 1})
    block = dit.transformer_blocks[0]
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    C = heads * head_dim
    emb = block.norm1.emb
    embedders = [emb] if shared_embedder else [copy.deepcopy(emb) for _ in range(layers)]
    conditioning = SharedConditioning(embedders, torch.empty(layers * 6 * C, C), torch.empty(layers * 6 * C),
                                      num_layers=layers)
    facts = {"num_heads": heads, "head_dim": head_dim, "width": C,
             "mlp_hidden": int(block_linears(block)["fc1"].out_features),
             "attn_norm_eps": float(block.norm1.norm.eps), "mlp_norm_eps": float(block.norm3.eps)}
    skeleton = SharedSkeleton(dit.pos_embed, conditioning, dit.proj_out_1, dit.proj_out_2, dit.norm_out.eps)
    return skeleton, facts


class DiTAdapter(ModelAdapter):
    """diffusers' ``DiTTransformer2DModel`` (class-conditional adaLN-Zero DiT); pruned into `MosaicDiT`."""

    name = "DiT"

    def handles(self, model: nn.Module) -> bool:
        from diffusers import DiTTransformer2DModel

        return isinstance(model, DiTTransformer2DModel)

    def validate(self, model: nn.Module) -> None:
        validate_dit(model)

    def blocks(self, model: nn.Module):
        return transformer_blocks(model)

    def groups(self, block: nn.Module) -> dict[str, PrunableGroup]:
        return block_groups(block_linears(block), int(block.attn1.heads))

    # run: the default, ``model(hidden_states=x_t, timestep=t, class_labels=...)``

    def check_calibration(self, model: nn.Module, calibration) -> None:
        """Class labels (one int per latent, in ``[0, num_embeds_ada_norm]``), the sample shape, the null class.

        Raises:
            TypeError: not a `ConditionedCalibration`, or one without ``conditions["class_labels"]``.
            ValueError: labels or null labels not class ids of this model, latents of another shape.
        """
        from mosaicdiff.method.calibrate import Calibration, ConditionedCalibration, check_latent_shape

        if isinstance(calibration, Calibration):
            calibration.check_model(model)  # its own messages (null_class=...)
            return
        conditioned = isinstance(calibration, ConditionedCalibration)
        labels = calibration.conditions.get("class_labels") if conditioned else None
        if labels is None:
            got = (f"conditions with keys {sorted(calibration.conditions)}" if conditioned
                   else type(calibration).__name__)
            raise TypeError(f"a DiT is calibrated with Calibration(x0, labels, null_class) or a ConditionedCalibration "
                            f"with conditions={{'class_labels': labels}}; got {got}")
        n = len(calibration)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"ConditionedCalibration.conditions['class_labels'] must be one class id per latent, "
                             f"shape ({n},), got {got}")
        if labels.is_floating_point():
            raise TypeError(f"ConditionedCalibration.conditions['class_labels'] must be integer class ids, "
                            f"got {labels.dtype}")
        check_latent_shape(calibration.latents, model)
        num_classes = unwrap_model(model).config.get("num_embeds_ada_norm")
        if num_classes is not None:
            check_class_ids(labels, int(num_classes), "ConditionedCalibration.conditions['class_labels']")
            nulls = calibration.null_conditions
            if nulls is not None and "class_labels" in nulls:
                check_class_ids(nulls["class_labels"], int(num_classes),
                                "ConditionedCalibration.null_conditions['class_labels']")

    def default_null_conditions(self, model: nn.Module, calibration) -> dict[str, torch.Tensor] | None:
        """The null class (``config.num_embeds_ada_norm``) for every latent's CFG branch."""
        num_classes = unwrap_model(model).config.get("num_embeds_ada_norm")
        if num_classes is None:
            return None
        labels = calibration.conditions["class_labels"]
        return {"class_labels": torch.full((1,), int(num_classes), dtype=labels.dtype, device=labels.device)}

    def dense_block(self, block: nn.Module) -> CompactBlockWeights:
        return dense_block_weights(block, int(block.attn1.heads))

    def compact_block(self, block: nn.Module, pruned: Mapping[str, PrunedGroup]) -> CompactBlockWeights:
        return compact_from_groups(pruned)

    def block_widths(self, block: nn.Module, weights: CompactBlockWeights) -> dict[str, float]:
        heads, mlp = int(block.attn1.heads), block_linears(block)["fc2"].in_features
        return {"heads": weights.num_heads, "mlp": weights.mlp_width,
                "head_sparsity": 1.0 - weights.num_heads / heads, "mlp_sparsity": 1.0 - weights.mlp_width / mlp}

    def shared_skeleton(self, model: nn.Module) -> SharedSkeleton:
        return skeleton_from_dense(model)


#: The DiT adapter (stateless: one instance serves every DiT).
DIT = DiTAdapter()

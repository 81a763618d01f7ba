"""What the method needs to know about the toy denoiser: its blocks and their MLP channels."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mosaicdiff.core.adapter import ModelAdapter, PrunableGroup, linear_bias, unwrap_model
from toyfam.dense import ToyDenoiser


@dataclass
class ToyBlockWeights:
    """One pruned block: the kept channels, fc1's kept rows, fc2's compensated kept columns."""

    kept: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


class ToyAdapter(ModelAdapter):
    name = "toy"

    def handles(self, model):
        return isinstance(model, ToyDenoiser)

    def validate(self, model):
        if not isinstance(unwrap_model(model), ToyDenoiser):
            raise ValueError(f"the toy adapter takes a ToyDenoiser, got {type(model).__name__}")

    def blocks(self, model):
        return list(unwrap_model(model).blocks)

    def groups(self, block):
        return {"mlp": PrunableGroup("channels", block.fc2, (block.fc1,))}

    def check_calibration(self, model, calibration):
        calibration.check_model(model)

    def default_null_conditions(self, model, calibration):
        return {"class_labels": torch.tensor([model.config.num_classes])}

    def dense_block(self, block):
        return ToyBlockWeights(torch.arange(block.fc1.out_features), block.fc1.weight.detach(),
                               linear_bias(block.fc1), block.fc2.weight.detach(), linear_bias(block.fc2))

    def compact_block(self, block, pruned):
        p = pruned["mlp"]
        return ToyBlockWeights(p.kept, p.producer_weights[0], p.producer_biases[0], p.consumer_weight,
                               p.consumer_bias)

    def block_widths(self, block, weights):
        return {"mlp": int(weights.kept.numel()), "mlp_sparsity": 1 - weights.kept.numel() / block.fc1.out_features}

    def shared_skeleton(self, model):
        return copy.deepcopy(unwrap_model(model).embed)


TOY = ToyAdapter()

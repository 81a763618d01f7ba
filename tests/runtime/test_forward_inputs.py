"""Bad inputs of MosaicDiT.forward and mosaicdiff.sample: clear errors, from metadata only.

Before, each of these failed deep inside (IndexError "index out of range in self", a conv
RuntimeError about channels or dtypes), or ran silently (a 9x9 input came back 8x8, a NaN guidance
scale gave black images).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mosaicdiff.families.dit.model import MosaicDiT
from mosaicdiff.core.sampling import sample
from tests.runtime.dit_helpers import ATOL, RTOL, inputs, tiny_dit, two_stage_specs


@pytest.fixture(scope="module")
def models():
    dense = tiny_dit()
    return dense, MosaicDiT.from_dense(dense, two_stage_specs(dense))


def _run(model, x, labels, t=900):
    with torch.no_grad():
        return model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample


@pytest.mark.parametrize("labels, bad", [
    (torch.tensor([11, 1]), 11), (torch.tensor([-1, 1]), -1), ([3, 12], 12), (11, 11),
])
def test_label_out_of_range(models, labels, bad):
    x, _ = inputs(batch=2)
    with pytest.raises(ValueError, match=rf"class_labels must be class ids in \[0, 10\) or the null class 10, "
                                         rf"got {bad}$"):
        _run(models[1], x, labels)


def test_null_class_and_python_labels_are_accepted(models):
    dense = models[0]
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    x, _ = inputs(batch=2)
    want = _run(dense, x, torch.tensor([10, 3]))
    for labels in (torch.tensor([10, 3]), [10, 3], torch.tensor([10, 3], dtype=torch.int32)):
        assert_close(_run(mosaic, x, labels), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("labels, exc, fragment", [
    (torch.tensor([1.0, 2.0]), TypeError, "class_labels must be integers, got torch.float32"),
    (torch.tensor([True, False]), TypeError, "class_labels must be integers, got torch.bool"),
    (torch.tensor([1, 2, 3]), ValueError, "class_labels must have 2 entries, got 3"),
])
def test_label_types_and_counts(models, labels, exc, fragment):
    x, _ = inputs(batch=2)
    with pytest.raises(exc, match=fragment):
        _run(models[1], x, labels)


def test_wrong_channel_count(models):
    x, labels = inputs(batch=2)
    with pytest.raises(ValueError, match=r"hidden_states has 3 channels but the model expects in_channels=4"):
        _run(models[1], x[:, :3], labels)


def test_size_not_a_multiple_of_the_patch(models):
    # diffusers silently returns an 8x8 output for a 9x9 input
    _, labels = inputs(batch=2)
    with pytest.raises(ValueError, match=r"height and width must be positive multiples of patch_size=2, got 9x9"):
        _run(models[1], torch.randn(2, 4, 9, 9), labels)


def test_other_multiple_sizes_run_like_diffusers(models):
    """As diffusers (positions recomputed for the new grid), a 12x12 input runs at 12x12."""
    dense = models[0]
    mosaic = MosaicDiT.from_dense_unpruned(dense)
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 10])
    got = _run(mosaic, x, labels)
    assert got.shape == (2, 8, 12, 12)
    assert_close(got, _run(dense, x, labels), atol=ATOL, rtol=RTOL)


def test_fp16_model_with_fp32_input_is_a_type_error(models):
    dense16 = tiny_dit().half()
    mosaic16 = MosaicDiT.from_dense(dense16, two_stage_specs(dense16))
    x, labels = inputs(batch=2)
    # diffusers does not cast either: it fails in the patch conv (what users of it expect)
    with pytest.raises(RuntimeError, match="Input type"):
        _run(dense16, x, labels)
    with pytest.raises(TypeError, match=r"hidden_states is torch.float32 but the model's weights are "
                                        r"torch.float16; pass hidden_states.to\(model.dtype\)"):
        _run(mosaic16, x, labels)
    with pytest.raises(TypeError, match=r"hidden_states is torch.float64 but the model's weights are torch.float32"):
        _run(models[1], x.double(), labels)


def test_input_on_another_device(models):
    _, labels = inputs(batch=2)
    with pytest.raises(ValueError, match=r"hidden_states is on meta but the model is on cpu"):
        _run(models[1], torch.empty(2, 4, 8, 8, device="meta"), labels)


def test_not_a_4d_tensor(models):
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, C, H, W\), got \(2, 4, 8\)"):
        _run(models[1], torch.randn(2, 4, 8), [1, 2])


class _NeverCalled(torch.nn.Module):
    """A DiT-like stub: config only; calling it fails the test."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("the model must not run on a bad guidance scale")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "2", None, True])
def test_guidance_scale_must_be_finite(models, scale):
    # was: NaN/inf ran every step and returned NaN images (a black PNG through the CLI)
    with pytest.raises(ValueError, match=r"sample: guidance_scale must be a finite number"):
        sample(_NeverCalled(models[0].config), [1, 2], num_inference_steps=2, guidance_scale=scale, progress=False)


def test_guidance_scale_accepts_numpy_and_tensor_scalars(models):
    import numpy as np

    dense = models[0]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = sample(dense, [1, 2], num_inference_steps=2, guidance_scale=2.0, noise=noise, progress=False)
    for scale in (np.float32(2.0), torch.tensor(2.0), 2):
        got = sample(dense, [1, 2], num_inference_steps=2, guidance_scale=scale, noise=noise, progress=False)
        assert torch.equal(got, want), scale

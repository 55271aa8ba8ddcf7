"""Linear n-bit rounding: the right number of levels, the right error, reported honestly."""
import numpy as np
import pytest
import torch

from sdwork.report.images import image_grid
from sdwork.compress.perturb import perturbed_copy, round_linear
from sdwork.load import load_pipeline
from sdwork.weights import weights_hash


def test_round_linear_levels_and_error():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    q = round_linear(w, 4)
    for row_w, row_q in zip(w.reshape(8, -1), q.reshape(8, -1)):
        step = row_w.abs().max() / 7  # 4 bits symmetric: levels -7..7
        assert len(torch.unique(row_q)) <= 15
        assert torch.allclose(row_q / step, torch.round(row_q / step), atol=1e-4)
        assert (row_q - row_w).abs().max() <= step / 2 + 1e-6
        assert row_q.abs().max() == pytest.approx(row_w.abs().max().item(), rel=1e-6)  # the extreme is a level
    assert torch.equal(round_linear(torch.zeros(2, 4), 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 16"):
        round_linear(w, 1)


def test_perturbed_copy_leaves_the_original_alone():
    pipe = load_pipeline("tiny-random", progress=False)
    before = weights_hash(pipe)
    other, report = perturbed_copy(pipe, 8)
    assert weights_hash(pipe) == before and weights_hash(other) != before
    n_params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert report.rounded_params + report.kept_params == n_params
    assert report.rounded_tensors > 50 and report.kept_tensors > 0 and "kept" in str(report)
    assert torch.equal(other.unet.conv_in.bias, pipe.unet.conv_in.bias)  # 1-D: kept
    assert not torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)
    _, again = perturbed_copy(pipe, 8)
    assert again == report


def test_image_grid_shape_and_errors():
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    fig = image_grid({"a": imgs, "b": imgs}, col_titles=["x", "y", "z"])
    assert fig.axes and len(fig.axes) == 6
    with pytest.raises(ValueError, match="same number of images"):
        image_grid({"a": imgs, "b": imgs[:2]})

"""The recipe panel's controls and run logic, without a kernel (tests/test_panel_kernel.py clicks
it in one): what is offered, what is disabled, what a double click and an error do."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdwork import hooks
from sdwork.compress.recipe import Recipe
from sdwork.errors import ConfigError
from sdwork.experiments.experiment import Variant

PROMPTS = ["a small red circle on a gray background", "a large blue square on a white background"]


class FakeExperiment:
    """What the panel uses of an Experiment: pipe (for what fits), progress, run()."""

    def __init__(self, fail=None):
        torch.manual_seed(0)
        # output channels 48 and 96: group size 64 divides neither, so it must not be offered
        self.pipe = SimpleNamespace(text_encoder=torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 96)))
        self.progress, self.fail, self.calls, self.seen = True, fail, [], []

    def run(self, recipe):
        self.calls.append(recipe)
        self.seen.append(self.panel.button.disabled)  # disabled while the run is under way
        if self.fail:
            raise self.fail
        hooks.fire("variant_compressed", name=recipe.name)
        self.seen.append(self.panel.progress.value)
        rng = np.random.default_rng(len(self.calls))
        images = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
        row = dict(name=recipe.name, size_bytes=1.5e6, size_ratio=0.3, psnr=30.0, ssim=0.9,
                   clip_image_image=0.9, clip_text_image=0.3,
                   per_prompt=[dict(prompt=p, psnr=30.0, ssim=0.9, clip_image_image=0.9, clip_text_image=0.3)
                               for p in PROMPTS],
                   settings=dict(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance=5.0, threads=1))
        return Variant(row, images, images[::-1].copy(), reused=False)


def panel_for(exp, **template):
    from sdwork.report.panel import recipe_panel

    exp.panel = recipe_panel(exp, Recipe(nbits=4, components=("text_encoder",), engine="sdwork", **template))
    return exp.panel


def test_group_size_disabled_under_per_tensor_and_only_fitting_sizes_offered():
    p = panel_for(FakeExperiment())
    assert p.granularity.value == "per_tensor" and p.group_size.disabled
    p.granularity.value = "per_grouped_channel"
    assert not p.group_size.disabled and list(p.group_size.options) == [4, 8, 16, 32]
    assert p.recipe().group_size == p.group_size.value
    p.granularity.value = "per_tensor"
    assert p.group_size.disabled and p.recipe().group_size is None


def test_cluster_dim_the_engine_cannot_run_switches_the_engine_visibly():
    p = panel_for(FakeExperiment())
    p.cluster_dim.value = 2
    assert p.engine.value == "coremltools" and "engine switched from sdwork to coremltools" in p.note.value
    p.recipe()  # a recipe the engine can run
    p.engine.value = "sdwork"
    assert p.cluster_dim.value == 1 and "cluster_dim set from 2 to 1" in p.note.value


def test_a_run_disables_the_panel_shows_progress_and_a_second_click_does_not_rerun():
    import matplotlib.pyplot as plt

    exp = FakeExperiment()
    p = panel_for(exp)
    p.run()
    p.run()  # a double click arrives as a second click once the first is done
    assert len(exp.calls) == 1 and p.runs == 1
    assert exp.seen == [True, 1] and not p.button.disabled  # disabled, progress moved, enabled again
    assert "km4-pt-te-sdwork" in p.status.value and "1.50 MB" in p.status.value
    assert plt.get_fignums() == [] and p.last_figure.tile_axes  # drawn outside pyplot, every tile placed
    p.nbits.value = 3
    p.run()
    assert [r.nbits for r in exp.calls] == [4, 3]


def test_an_error_is_shown_once_with_its_fix():
    exp = FakeExperiment(fail=ConfigError("group_size=64 divides no layer; use one of [4, 8]"))
    p = panel_for(exp)
    p.run()
    p.run()
    assert len(exp.calls) == 1  # the same settings are not retried by a second click
    assert p.status.value.count("error:") == 1 and "use one of [4, 8]" in p.status.value
    assert p.out.outputs == () and not p.button.disabled


@pytest.mark.parametrize("engine", ["coremltools", "torch"])
def test_vector_palettization_offered_with_engines_that_run_it(engine):
    p = panel_for(FakeExperiment())
    p.engine.value = engine
    assert list(p.cluster_dim.options) == [1, 2, 4]
    p.cluster_dim.value = 4
    assert p.engine.value == engine and p.recipe().cluster_dim == 4


def test_the_family_picks_the_recipe_and_disables_what_does_not_apply():
    p = panel_for(FakeExperiment())
    assert p.family.value == "palettize" and p.recipe().family == "palettize"
    p.family.value = "linear"
    assert list(p.choice.options) == ["int8 per-channel", "int4 per-block 32", "int4 per-block 64"]
    assert all(c.disabled for c in p.lut_controls) and not p.choice.disabled
    assert (p.recipe().family, p.recipe().linear_bits, p.recipe().nbits) == ("linear", 8, None)
    p.choice.value = "int4 per-block 32"
    assert (p.recipe().linear_bits, p.recipe().block_size) == (4, 32)
    p.family.value = "prune"
    p.choice.value = "2:4"
    assert p.recipe().n_m == (2, 4) and p.recipe().linear_bits is None and p.recipe().family == "prune"
    p.family.value = "joint"
    assert not p.nbits.disabled and p.recipe().family == "joint" and p.recipe().sparsity == 0.5
    p.choice.value = "LUT in int8"
    assert (p.recipe().lut_dtype, p.recipe().nbits, p.recipe().sparsity) == ("int8", 4, None)
    p.family.value = "palettize"
    assert p.recipe() == Recipe(nbits=4, components=("text_encoder",), engine="sdwork")

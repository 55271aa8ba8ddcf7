"""One rule for every relative path parameter (run folders, grid files, package folders, model and
CLIP folders): under the checkout, wherever the process started (a notebook kernel starts in
notebooks/)."""
from pathlib import Path

import pytest
import yaml

from sdwork import paths
from sdwork.experiments import grids


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A stand-in checkout, and a current folder elsewhere (as a kernel in notebooks/)."""
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setattr(paths, "repo_root", lambda: root)
    monkeypatch.chdir(root / "notebooks")
    return root


def test_relative_paths_resolve_under_the_checkout_not_the_current_folder(checkout):
    assert paths.resolve("runs/x") == checkout / "runs/x" == paths.run_dir("runs/x")
    assert paths.resolve("/abs/x") == Path("/abs/x")
    assert paths.resolve("~/x") == Path.home() / "x"
    assert grids.grid_path("grids/mine.yaml") == checkout / "grids/mine.yaml"
    assert grids.grid_path("ci") == paths.GRIDS / "ci.yaml"


def test_a_notebooks_grid_and_out_follow_the_same_rule(checkout):
    from sdwork.experiments.experiment import _out_dir
    from test_cli_options import GRID

    (checkout / "grids").mkdir()
    (checkout / "grids" / "mine.yaml").write_text(yaml.safe_dump(
        {**GRID, "generation": {"prompts": ["a red circle"], "seeds": [0]}}))
    (Path.cwd() / "grids").mkdir()  # the same name beside the kernel: not the one taken
    (Path.cwd() / "grids" / "mine.yaml").write_text("not: [a grid")
    assert grids.load_grid("grids/mine.yaml").settings.prompts == ("a red circle",)
    assert _out_dir("runs/sweep") == checkout / "runs/sweep"


def test_model_and_clip_folders_resolve_the_same_way_and_hub_ids_pass(checkout):
    (checkout / "models" / "sd15").mkdir(parents=True)
    assert paths.spec("models/sd15") == str(checkout / "models/sd15")
    assert paths.spec("./models/sd15") == str(checkout / "models/sd15")
    assert paths.spec("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert paths.spec("some/deep/folder") == str(checkout / "some/deep/folder")  # no hub id: a path
    from sdwork.errors import ModelNotFoundError
    from sdwork.evaluate.metrics import ClipScorer
    from sdwork.load import load_pipeline

    with pytest.raises(ModelNotFoundError, match=str(checkout / "models/sd15") + " is not a diffusers"):
        load_pipeline("models/sd15")
    with pytest.raises(ModelNotFoundError, match=str(checkout / "models/sd15") + " is not a CLIP model folder"):
        ClipScorer("models/sd15")

"""Notebook 02 runs headlessly on a small grid and leaves a results file, plots and a tried recipe."""
import pandas as pd
import pytest
from nbrun import run_notebook


@pytest.mark.slow
def test_sweep_notebook(tmp_path):
    out = tmp_path / "run"
    # tiny-random shares the fp16 package cache with tests/test_sweep.py; only the text encoder is compressed
    run_notebook("02_palettize_sweep.ipynb", tmp_path, grid="ci", model="tiny-random", scorer="tiny-random",
                 engine="coremltools", components=["text_encoder"], limit=2, out=str(out),
                 try_nbits=3, try_group_size=None, try_run=True, progress=False)
    results = pd.read_json(out / "results.jsonl", lines=True).head(2)
    assert list(results["name"]) == ["km2-pt-te", "km2-g16-te"]
    assert (results["size_ratio"] < 1).all() and results["psnr"].notna().all()
    for png in ("size_vs_metrics.png", "image_grid.png", "layer_errors.png"):
        assert (out / png).stat().st_size > 1000, png
    # the tried recipe joined the results; the sweep's own rows were not recomputed
    after = pd.read_json(out / "results.jsonl", lines=True)
    assert list(after["name"]) == ["km2-pt-te", "km2-g16-te", "km3-pt-te"] and (out / "images" / "km3-pt-te.npz").exists()

    # rerun: the sweep is read back, and a tried recipe not yet scored is not run unless asked
    nb = run_notebook("02_palettize_sweep.ipynb", tmp_path, grid="ci", model="tiny-random", scorer="tiny-random",
                      engine="coremltools", components=["text_encoder"], limit=2, out=str(out),
                      try_nbits=6, try_group_size=None, progress=False)
    assert (out / "results.jsonl").read_text().count("\n") == 3 and not (out / "images" / "km6-pt-te.npz").exists()
    assert "km6-pt-te is not in the results: set try_run = True" in nb.read_text()

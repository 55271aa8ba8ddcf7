"""Notebook 03 runs headlessly on tiny settings and leaves uniform and mixed-bit rows in one table."""
import nbformat
import pandas as pd
import pytest
from conftest import tiny_specs
from nbrun import run_notebook

from sdwork.experiments.results import load_results


@pytest.mark.slow
def test_mixed_bit_notebook(tmp_path):
    model, clip = tiny_specs()
    out = tmp_path / "run"
    executed = run_notebook(
        "03_mixed_bit.ipynb", tmp_path, model=model, scorer=clip, out_dir=str(out), probe_steps=1,
        probe_prompts=["a small red circle on a gray background"], nbits=[2, 8], group_sizes=[None],
        max_layers=4, curve_bits=[3.0, 6.0], match_bits=[4], match_group=None,
        prompts=["a small green circle on a black background"], seeds=[0], steps=2, progress=False)
    results = load_results(out)
    uniform = results[results["method"] == "uniform"]
    mixed = results[results["method"].isin(["greedy", "apple"])]
    assert list(uniform["name"]) == ["km4-pt-unet-sdwork"]
    assert sorted(mixed["label"]) == ["apple 4-bit", "greedy image_mse 4-bit"]
    # no larger than the uniform 4-bit package, measured on the written packages
    assert (mixed["bytes_unet"] <= uniform["bytes_unet"].min()).all()
    assert (mixed["predicted_bytes"] == mixed["bytes_unet"]).all()  # the exact size model, checked on the package
    sens = pd.read_json(out / "sensitivity.jsonl", lines=True)
    assert len(sens) == 4 * 2 and set(sens["candidate"]) == {"2-pt", "8-pt"}
    curve = pd.read_csv(out / "curve.csv")
    assert set(curve["method"]) == {"greedy", "apple", "uniform"}
    for f in ("sensitivity.png", "curve.png", "pareto.png", "grid.png"):
        assert (out / f).stat().st_size > 1000
    # the notebook says which mixed recipes are a copy of another row
    cells = nbformat.read(executed, as_version=4).cells
    text = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)
    copies = mixed[mixed["same_as"].notna()] if "same_as" in mixed else mixed.iloc[0:0]
    for _, r in copies.iterrows():
        assert f"{r['label']}: the same recipe as {r['same_as']}" in text
    if copies.empty:
        assert "every mixed recipe differs from the uniform ones" in text

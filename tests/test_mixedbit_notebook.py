"""Notebook 03 runs headlessly on tiny settings and leaves uniform and mixed-bit rows in one table."""
import pandas as pd
from conftest import tiny_specs
from nbrun import run_notebook

from sdwork.experiments.experiment import load_results


def test_mixed_bit_notebook(tmp_path):
    model, clip = tiny_specs()
    out = tmp_path / "run"
    run_notebook("03_mixed_bit.ipynb", tmp_path, model=model, scorer=clip, out_dir=str(out), probe_steps=1,
                 probe_prompts=["a small red circle on a gray background"], nbits=[2, 8], group_sizes=[None],
                 max_layers=4, curve_bits=[3.0, 6.0], match_bits=[4], match_group=None, prompts=["a small green circle on a black background"],
                 seeds=[0], steps=2, progress=False)
    results = load_results(out)
    uniform = results[results["method"] == "uniform"]
    mixed = results[results["method"].isin(["greedy", "apple"])]
    assert list(uniform["name"]) == ["km4-pt-unet-sdwork"]
    assert len(mixed) >= 1 and mixed["overrides"].map(len).gt(0).all()
    # no larger than the smaller uniform 4-bit package, measured on the written packages
    assert (mixed["bytes_unet"] <= uniform["bytes_unet"].min()).all()
    assert (mixed["predicted_bytes"] == mixed["bytes_unet"]).all()  # the exact size model, checked on the package
    sens = pd.read_json(out / "sensitivity.jsonl", lines=True)
    assert len(sens) == 4 * 2 and set(sens["candidate"]) == {"2-pt", "8-pt"}
    curve = pd.read_csv(out / "curve.csv")
    assert set(curve["method"]) == {"greedy", "apple", "uniform"}
    for f in ("sensitivity.png", "curve.png", "pareto.png", "grid.png"):
        assert (out / f).stat().st_size > 1000

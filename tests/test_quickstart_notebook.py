"""The quickstart notebook runs headlessly and writes a sane results table."""
import json

import numpy as np
import pandas as pd
from conftest import tiny_specs
from nbrun import run_notebook

PROMPTS = ["a small red circle on a gray background", "a large blue square on a white background"]


def test_quickstart_writes_results(tmp_path):
    model, clip = tiny_specs()
    out = tmp_path / "out"
    run_notebook("00_quickstart.ipynb", tmp_path, model=model, clip_model=clip, prompts=PROMPTS, seeds=[0, 1],
                 steps=4, perturb_bits=8, out_dir=str(out), progress=False)
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["variant", "image", "prompt", "seed_index", "seed", "psnr", "ssim",
                                   "clip_image_image", "clip_text_image", "clip_model", "clip_valid", "scorer_note"]
    assert len(table) == 4 and table.prompt.tolist() == [p for p in PROMPTS for _ in range(2)]
    assert table.seed.tolist() == [0, 1, 0, 1] and (table.variant == "linear 8-bit").all()
    metrics = table[["psnr", "ssim", "clip_image_image", "clip_text_image"]].to_numpy()
    assert np.isfinite(metrics).all()  # finite PSNR: the rounding really changed the images
    assert (table.ssim <= 1).all() and (table.clip_image_image.abs() <= 1 + 1e-9).all()
    assert table.psnr.mean() > 25  # 8-bit rounding drifts little: a lower figure means mismatched images
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perturbation"]["bits"] == 8 and summary["perturbation"]["rounded_tensors"] > 50
    assert summary["baseline_weights"] != summary["perturbed_weights"]
    assert (out / "grid.png").stat().st_size > 1000

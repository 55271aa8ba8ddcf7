"""Notebook 04 runs headless on tiny parameters and writes a DKM row beside the post-training row."""
import json

import pandas as pd
import pytest
from conftest import tiny_specs
from nbrun import run_notebook


@pytest.mark.slow
def test_dkm_notebook_runs_and_compares_with_post_training(tmp_path):
    model, clip = tiny_specs()
    out = tmp_path / "out"
    executed = run_notebook(
        "04_train_time_dkm.ipynb", tmp_path, model=model, scorer=clip, nbits=2, steps=2, batch=2,
        weight_threshold=200_000,  # the 4 largest UNet layers: keeps the run to seconds
        prompts=["a small green circle on a black background"], seeds=[0], gen_steps=2,
        out_dir=str(out), progress=False,
    )
    rows = pd.read_json(out / "results.jsonl", lines=True).set_index("name")
    assert len(rows) == 2 and "km2-pt-wt200000-unet-sdwork" in rows.index  # the post-training row, same recipe
    assert rows.loc["km2-pt-wt200000-unet-sdwork", "method"] == "post-training"
    ours = rows[rows["method"] == "dkm"].iloc[0]
    assert ours.name.startswith("km2-pt-wt200000-unet-dkm2-")  # batch 2 is not the default: hashed suffix
    assert ours["lut_count"] == 4 and ours["dkm"]["steps"] == 2
    assert ours["dkm_data"]["kind"] == "distill"  # the row is keyed by what DKM trained on
    for m in ("psnr", "ssim", "clip_image_image", "clip_text_image"):
        assert pd.notna(ours[m])
    assert len(pd.read_csv(out / "dkm" / ours.name / "loss.csv")) == 2
    # the loss curve, the image grid and the size plot were drawn, not silently skipped
    cells = json.loads(executed.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
    # the comparison table: the two rows, post-training first
    tables = [o["data"]["text/plain"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("post-training" in "".join(t) and "dkm" in "".join(t) for t in tables)

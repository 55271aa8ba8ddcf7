"""What sdwork.report draws, as a person reads it in a notebook column: figures outside pyplot,
about 750 px wide, axis labels in words with units, grid titles with prompt and seed, row labels
inside their row, colour by compression family when there is one; and tables that fit."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sdwork.report import plots, tables
from sdwork.report.figure import png
from sdwork.report.images import image_grid, pair_titles, tile_boxes

PROMPTS = ["a small green circle on a black background", "a large red square on a white background"]


def results(family=False) -> pd.DataFrame:
    rows = []
    for i, (n, g) in enumerate([(2, None), (2, 16), (4, None), (4, 16), (6, None), (8, 16)]):
        name = f"km{n}-{'pt' if g is None else f'g{g}'}-sdwork"
        rows.append(dict(name=name, engine="sdwork", nbits=n, granularity="per_tensor" if g is None else
                         "per_grouped_channel", group_size=g, size_bytes=1e6 * (1 + n + 0.1 * bool(g)),
                         size_ratio=0.1 * n, bits_per_weight=n + 0.1, psnr=10.0 + 5 * n + 2 * bool(g), ssim=0.1 * n,
                         clip_image_image=0.1 * n, clip_text_image=0.3, compress_s=1.0, evaluate_s=2.0, lut_count=9,
                         status="ok", per_prompt=[dict(prompt=p, psnr=10.0 + n) for p in PROMPTS],
                         uncompressed=[dict(component="unet", name="p_conv_out", torch_name="conv_out.weight",
                                            shape=[4, 64, 3, 3], reason="4 channels not divisible by group_size 16")]
                         if g else []))
        if family:
            rows[-1]["family"] = ["palettize", "linear", "prune"][i % 3]
    return pd.DataFrame(rows)


def pixels(fig):
    return np.asarray(Image.open(io.BytesIO(png(fig))).convert("RGB"))


@pytest.mark.parametrize("family", [False, True])
def test_size_vs_metrics_fits_a_column_and_speaks_in_words(family):
    import matplotlib.pyplot as plt

    fig = plots.size_vs_metrics(results(family))
    h, w, _ = pixels(fig).shape
    assert 700 <= w <= 800 and h < 800 and plt.get_fignums() == []
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4 and {ax.get_xlabel() for ax in axes} == {"package size (MB)"}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    if family:  # colour is the family, marker the granularity
        assert {"palettize", "linear", "prune", "per-tensor", "group 16"} <= set(legend)
    else:
        assert legend == ["per-tensor", "group 16", "Pareto front"]
    front_labels = [t.get_text() for t in axes[0].texts]
    assert front_labels and all(not t.endswith("-sdwork") for t in front_labels)  # the shared engine is dropped
    assert all(t.get_fontsize() >= 7 for t in axes[0].texts)


def test_size_vs_metrics_unet_bytes_label():
    fig = plots.size_vs_metrics(results().assign(bytes_unet=lambda d: d.size_bytes / 2), ["psnr", "ssim"],
                                x="bytes_unet")
    assert [ax.get_xlabel() for ax in fig.axes] == ["UNet package size (MB)"] * 2


def test_image_grid_titles_carry_whole_prompt_and_seed_and_labels_stay_in_their_row():
    rng = np.random.default_rng(0)
    rows = {"fp16 baseline": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
            "km2-pt\n2.82 MB (0.21x)\nPSNR 15.4 dB\nSSIM 0.482": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)}
    titles = pair_titles([(p, s) for p in PROMPTS for s in (0, 1)])
    fig = image_grid(rows, titles)
    texts = [t.get_text().replace("\n", " ") for t in fig.texts]
    # each prompt whole, once over its two seeds; a seed over each column
    assert [t for t in texts if t in PROMPTS] == PROMPTS
    assert [t for t in texts if t.startswith("seed")] == ["seed 0", "seed 1"] * 2
    renderer = fig.canvas.get_renderer()
    boxes = tile_boxes(fig)
    h = fig.get_size_inches()[1] * fig.dpi
    for r, label in enumerate(fig.texts[:2]):
        ext = label.get_window_extent(renderer)
        top, bottom = h - ext.y1, h - ext.y0
        row_top, row_bottom = boxes[r][0][1], boxes[r][0][3]
        assert row_top - 4 <= top and bottom <= row_bottom + 4, f"row {r} label runs out of its row"
    assert 400 < pixels(fig).shape[1] <= 800


def test_notebook_figure_shows_itself_as_png():
    fig = plots.size_vs_metrics(results())
    bundle = fig._repr_mimebundle_()
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_errors_fits_a_column():
    errors = pd.DataFrame(dict(name=[f"w{i}" for i in range(10)], torch_name=[f"layer.{i}.weight" for i in range(10)],
                               snr_db=np.arange(10.0), changed=True))
    assert pixels(plots.layer_errors(errors)).shape[1] == 750


def test_tables_fit_a_column():
    df = results()
    s = tables.summary(df)
    assert list(s.columns) == ["variant", "size (MB)", "x fp16", "bits/weight", "PSNR (dB)", "SSIM", "CLIP img",
                               "CLIP text"]
    assert s["variant"].iloc[0] == "km2-pt" and s["size (MB)"].iloc[0] == 3.0
    assert "family" in tables.summary(results(family=True)).columns
    assert list(tables.timings(df).columns) == ["variant", "compress (s)", "evaluate (s)"]
    u = tables.uncompressed(df)
    assert len(u) == 1 and u["variants"].iloc[0] == "km2-g16, km4-g16, km8-g16"
    pp = tables.per_prompt(df)
    assert list(pp.columns) == ["small green circle on a black", "large red square on a white"]


def test_metrics_table_names_columns_in_words():
    row = dict(psnr=30.0, ssim=0.9, per_prompt=[dict(prompt=PROMPTS[0], psnr=30.123456, ssim=0.91234)])
    t = plots.metrics_table(row)
    assert list(t.columns) == ["prompt", "PSNR (dB)", "SSIM"] and t["PSNR (dB)"].iloc[1] == 30.12

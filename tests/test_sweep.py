"""Sweep end to end on tiny-random: exact weights, rows, resume after a crash, plots, CLI.

Only the text encoder is compressed (0.14 M weights) so the real coremltools
palettization stays fast; the fp16 packages are converted once and cached.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest

from sdwork import sweep
from sdwork.compress.apply import EngineUnavailableError, compress, uncompressed_layers
from sdwork.evaluate.variant import evaluate, layer_errors
from sdwork.compress.recipe import Recipe
from sdwork.coreml.sizes import WEIGHTS, package_sizes

GRID = dict(
    model="tiny-random", engine="coremltools", components=["text_encoder"], scorer="tiny-random",
    generation=dict(prompts=["a small red circle on a gray background", "a large blue square on a white background"],
                    seeds=[0], steps=2, guidance=5.0, threads=1),
    grid=dict(nbits=[4, 2], group_size=[None, 16]),
)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cfg = sweep.load_config(GRID)
    return sweep.prepare(cfg, tmp_path_factory.mktemp("sweep") / "shared", progress=False)


def test_fp16_packages_reproduce_the_baseline_exactly(ctx):
    ev = evaluate(ctx.pipe, ctx.fp16_packages, ctx.config.settings, ctx.baseline, ctx.scorer, progress=False)
    assert ev.means["identical_images"] == len(ctx.baseline) and ev.means["psnr"] == float("inf")
    assert np.array_equal(ev.images, ctx.baseline)
    assert ev.coreml_predict.startswith("skipped")


def test_sweep_rows_resume_after_a_crash(ctx, tmp_path, monkeypatch):
    cfg = sweep.load_config({**GRID, "grid": dict(nbits=[4, 2], group_size=[None])})
    calls = []
    real = sweep.run_variant

    def crash_on_second(c, recipe, progress=False, out_dir=None):
        calls.append(recipe.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(c, recipe, progress, out_dir)

    monkeypatch.setattr(sweep, "run_variant", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, tmp_path, progress=False, ctx=ctx)
    first = (tmp_path / "results.jsonl").read_text()
    assert len(first.splitlines()) == 1 and json.loads(first)["name"] == "km4-pt-te"

    # a crash in the middle of writing leaves a torn line: ignored, then cut off
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"key": "torn", "name": ')
    assert [r["name"] for r in sweep.read_rows(tmp_path / "results.jsonl")] == ["km4-pt-te"]

    calls.clear()
    monkeypatch.setattr(sweep, "run_variant",
                        lambda c, r, progress=False, out_dir=None: (calls.append(r.name), real(c, r, out_dir=out_dir))[1])
    df = sweep.run_sweep(cfg, tmp_path, progress=False, ctx=ctx)
    assert calls == ["km2-pt-te"]  # the finished row was not recomputed
    text = (tmp_path / "results.jsonl").read_text()
    assert text.startswith(first) and text.count("\n") == 2 and "torn" not in text
    assert list(df["name"]) == ["km4-pt-te", "km2-pt-te"]
    calls.clear()
    sweep.run_sweep(cfg, tmp_path, progress=False, ctx=ctx)
    assert calls == []
    # pandas reads the file directly
    assert len(pd.read_json(tmp_path / "results.jsonl", lines=True)) == 2


def test_row_contents_agree_with_the_files(ctx, tmp_path):
    recipe = Recipe(nbits=4, granularity="per_grouped_channel", group_size=16, components=("text_encoder",))
    row, images = sweep.run_variant(ctx, recipe, out_dir=tmp_path)
    pkg = tmp_path / row["packages"] / "TextEncoder.mlpackage"
    assert row["bytes_text_encoder"] == os.path.getsize(pkg / WEIGHTS)
    assert row["size_bytes"] == sum(os.path.getsize(p / WEIGHTS) for c, p in ctx.fp16_packages.items()
                                    if c != "text_encoder") + row["bytes_text_encoder"]
    assert 0 < row["size_ratio"] < 1
    te = package_sizes(pkg)
    assert row["lut_count"] == te.lut_count > 0
    assert row["bits_per_weight"] == round(8 * te.weight_bin_bytes / te.n_weights, 4)
    # the token embedding (vocabulary rows) is not divisible by 16: listed with the reason, stored fp16
    skipped = {u["torch_name"]: u for u in row["uncompressed"]}
    emb = skipped["embeddings.token_embedding.weight"]
    assert emb["kind"] == "channels_not_divisible" and "not divisible by group_size 16" in emb["reason"]
    assert row["uncompressed_by_reason"]["channels_not_divisible"]["layers"] >= 1
    _assert_mask_kept_dense(row["uncompressed"], te)
    assert [p["prompt"] for p in row["per_prompt"]] == list(ctx.config.settings.prompts)
    for m in ("psnr", "ssim", "clip_image_image", "clip_text_image"):
        assert np.isfinite(row[m]), m
    assert 0 < row["ssim"] < 1 and row["psnr"] > 10
    assert images.shape == ctx.baseline.shape and not np.array_equal(images, ctx.baseline)
    json.dumps(row)  # serialisable as is

    # deterministic: the same recipe again gives the same bytes and images
    row2, images2 = sweep.run_variant(ctx, recipe, out_dir=tmp_path / "again")
    assert np.array_equal(images, images2)
    assert (pkg / WEIGHTS).read_bytes() == (tmp_path / "again" / row2["packages"] / "TextEncoder.mlpackage" / WEIGHTS).read_bytes()

    errors = layer_errors(ctx.fp16_packages["text_encoder"], pkg)
    changed = errors[errors["changed"]]
    assert len(changed) == row["sizes"]["text_encoder"]["n_compressed"]
    assert (changed["snr_db"] > 5).all() and (changed["rel_rmse"] < 0.5).all()
    assert not errors.set_index("torch_name").loc["embeddings.token_embedding.weight", "changed"]


@pytest.fixture(scope="module")
def swept(ctx, tmp_path_factory):
    """A finished two-variant sweep (per-tensor 4-bit, grouped 2-bit) in its own run folder."""
    out = tmp_path_factory.mktemp("swept")
    cfg = sweep.load_config({**GRID, "grid": dict(nbits=[4, 2], group_size=[None, 16])})
    cfg.recipes = [r for r in cfg.recipes if r.name in ("km4-pt-te", "km2-g16-te")]
    return out, sweep.run_sweep(cfg, out, progress=False, ctx=ctx)


def test_plots(ctx, swept):
    import matplotlib.pyplot as plt

    from sdwork import plots

    run, df = swept
    fig = plots.size_vs_metrics(df)
    assert len(fig.axes) == 4
    assert plots.pareto_front(df, "size_bytes", "psnr").any()
    fig2 = plots.image_grid(run, ["km4-pt-te", "km2-g16-te"])
    assert len(fig2.axes) == 3 * len(ctx.baseline)
    fig3 = plots.layer_errors(layer_errors(ctx.fp16_packages["text_encoder"],
                                           run / "variants" / "km2-g16-te" / "TextEncoder.mlpackage"))
    assert fig3.axes[0].patches
    plt.close("all")


def _assert_mask_kept_dense(uncompressed: list[dict], sizes) -> None:
    """The causal mask (a const, no weight) stays fp16 and is listed as such; every other
    dense layer of that size class is a model weight."""
    masks = [u for u in uncompressed if u["kind"] == "not_a_weight"]
    assert [u["shape"] for u in masks] == [[1, 1, 77, 77]] and masks[0]["torch_name"] is None
    assert "not a module weight" in masks[0]["reason"]
    assert not any(l.compressed for l in sizes.layers if l.name == masks[0]["name"])


def test_pareto_front():
    from sdwork.report.plots import pareto_front

    df = pd.DataFrame(dict(size_bytes=[1, 2, 3, 3, 4], psnr=[10, 20, 15, 30, 30]))
    assert list(pareto_front(df)) == [True, True, False, True, False]


def test_engines(ctx, tmp_path):
    r = Recipe(nbits=4, components=("text_encoder",), engine="sdwork")
    try:
        from sdwork.compress.palettize_fast import palettize_mlmodel  # noqa: F401
    except ImportError:
        with pytest.raises(EngineUnavailableError, match="engine='coremltools'"):
            compress(r, ctx.fp16_packages, tmp_path, progress=False)
        return
    fast = compress(r, ctx.fp16_packages, tmp_path / "fast", progress=False)
    ref = compress(r.with_(engine="coremltools"), ctx.fp16_packages, tmp_path / "ref", progress=False)
    a, b = fast.sizes["text_encoder"], ref.sizes["text_encoder"]
    assert a.weight_bin_bytes == b.weight_bin_bytes and a.lut_count == b.lut_count  # same layout
    _assert_mask_kept_dense(uncompressed_layers(fast, ctx.weight_maps), a)
    vector = Recipe(nbits=4, granularity="per_grouped_channel", group_size=16, cluster_dim=2,
                    components=("text_encoder",), engine="sdwork")
    with pytest.raises(EngineUnavailableError, match="engine='coremltools'"):
        compress(vector, ctx.fp16_packages, tmp_path / "vec", progress=False)


def test_torch_engine(ctx, tmp_path):
    r = Recipe(nbits=4, components=("text_encoder",), engine="torch")
    done = compress(r, ctx.fp16_packages, tmp_path, pipe=ctx.pipe, progress=False)
    s = done.sizes["text_encoder"]
    assert s.lut_count > 0 and s.weight_bin_bytes < package_sizes(ctx.fp16_packages["text_encoder"]).weight_bin_bytes
    # the causal-mask constant is no module weight: every engine leaves it, and says so
    _assert_mask_kept_dense(uncompressed_layers(done, ctx.weight_maps), s)
    ev = evaluate(ctx.pipe, done.packages, ctx.config.settings, ctx.baseline, None, progress=False)
    assert 10 < ev.means["psnr"] < float("inf")


def test_cli(ctx, swept, tmp_path, capsys):
    import yaml

    from sdwork.cli import main

    run, df = swept
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "grid": dict(nbits=[4], group_size=[None])}))
    before = (run / "results.jsonl").read_text()
    assert main(["sweep", "--grid", str(grid), "--out", str(run), "--no-progress"]) == 0
    assert (run / "results.jsonl").read_text() == before  # finished already: skipped
    out = capsys.readouterr().out
    assert "km4-pt-te" in out and "1 variants of this grid" in out
    assert main(["results", str(run)]) == 0
    assert "km2-g16-te" in capsys.readouterr().out
    assert main(["sizes", str(ctx.fp16_packages["unet"])]) == 0
    assert "weight_bin_bytes=" in capsys.readouterr().out
    assert main(["sweep", "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "no grid file" in capsys.readouterr().err


def test_a_run_folder_holds_one_setup(tmp_path):
    cfg = sweep.load_config(GRID)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    sweep._init_run_dir(cfg, tmp_path, images, "abc", "clip1")
    sweep._init_run_dir(cfg, tmp_path, images, "abc", "clip1")  # same setup: fine (more recipes may be added)
    other = sweep.load_config({**GRID, "generation": {**GRID["generation"], "steps": 3}})
    with pytest.raises(ValueError, match="another model, weights, generation settings or scorer.*new run folder"):
        sweep._init_run_dir(other, tmp_path, images, "abc", "clip1")
    with pytest.raises(ValueError, match="weights_hash"):
        sweep._init_run_dir(cfg, tmp_path, images, "retrained", "clip1")
    with pytest.raises(ValueError, match="scorer_hash"):  # a retrained CLIP scorer: old rows are not comparable
        sweep._init_run_dir(cfg, tmp_path, images, "abc", "clip2")

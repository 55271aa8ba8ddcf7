"""Experiment end to end on tiny-random: exact weights, rows, resume after a crash, plots, CLI.

Only the text encoder is compressed (0.14 M weights) so the real coremltools
palettization stays fast; the fp16 packages are converted once and cached.
"""
import json
import os

import numpy as np
import pandas as pd
import pytest

from sdwork import hooks
from sdwork.compress.apply import compress, uncompressed_layers
from sdwork.compress.recipe import Recipe
from sdwork.coreml.sizes import WEIGHTS, package_sizes
from sdwork.errors import MismatchError
from sdwork.evaluate.variant import evaluate, layer_errors
from sdwork.experiments import grids
from sdwork.experiments.experiment import Experiment
from sdwork.experiments.results import load_results, read_rows
from sdwork.generate import GenSettings

GRID = dict(
    model="tiny-random", engine="coremltools", components=["text_encoder"], scorer="tiny-random",
    generation=dict(prompts=["a small red circle on a gray background", "a large blue square on a white background"],
                    seeds=[0], steps=2, guidance=5.0, threads=1),
    grid=dict(nbits=[4, 2], group_size=[None, 16]),
)
SETTINGS = GenSettings.from_dict(GRID["generation"])
TE = ("text_encoder",)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return Experiment("tiny-random", SETTINGS, "tiny-random", tmp_path_factory.mktemp("sweep") / "shared",
                      progress=False)


def other(exp, out) -> Experiment:
    """Another run folder on the same (already loaded) fp16 pipeline and scorer."""
    e = Experiment(exp.model, exp.settings, None, out, pipe=exp.pipe, progress=False)
    e.scorer, e.scorer_spec, e.scorer_hash = exp.scorer, exp.scorer_spec, exp.scorer_hash
    return e


def test_fp16_packages_reproduce_the_baseline_exactly(exp):
    ev = evaluate(exp.pipe, exp.fp16_packages(), exp.settings, exp.baseline, exp.scorer, progress=False)
    assert ev.means["identical_images"] == len(exp.baseline) and ev.means["psnr"] == float("inf")
    assert np.array_equal(ev.images, exp.baseline)


@pytest.mark.slow
def test_sweep_rows_resume_after_a_crash(exp, tmp_path):
    e = other(exp, tmp_path)
    recipes = [Recipe(nbits=4, components=TE), Recipe(nbits=2, components=TE)]
    done = []

    def crash_on_second(name):
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt("simulated interruption")

    with hooks.on("variant_compressed", crash_on_second), pytest.raises(KeyboardInterrupt):
        e.sweep(recipes)
    first = (tmp_path / "results.jsonl").read_text()
    assert len(first.splitlines()) == 1 and json.loads(first)["name"] == "km4-pt-te"
    assert not (tmp_path / "variants" / "km2-pt-te").exists()  # the interrupted variant left nothing

    # a crash in the middle of writing leaves a torn line: ignored, then cut off
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"key": "torn", "name": ')
    assert [r["name"] for r in read_rows(tmp_path / "results.jsonl")] == ["km4-pt-te"]

    done.clear()
    with hooks.on("variant_compressed", lambda name: done.append(name)):
        df = e.sweep(recipes)
    assert done == ["km2-pt-te"]  # the finished row was not recomputed
    text = (tmp_path / "results.jsonl").read_text()
    assert text.startswith(first) and text.count("\n") == 2 and "torn" not in text
    assert list(df["name"]) == ["km4-pt-te", "km2-pt-te"]
    done.clear()
    with hooks.on("variant_compressed", lambda name: done.append(name)):
        e.sweep(recipes)
        v = e.run(recipes[0])  # in the results: read back, not run
    assert done == [] and v.reused and v.images.shape == e.baseline.shape
    assert len(pd.read_json(tmp_path / "results.jsonl", lines=True)) == 2  # pandas reads the file directly


@pytest.mark.slow
def test_row_contents_agree_with_the_files(exp, tmp_path):
    recipe = Recipe(nbits=4, group_size=16, components=TE)
    assert recipe.granularity == "per_grouped_channel"  # implied by group_size
    v = other(exp, tmp_path).run(recipe)
    row, images = v.row, v.images
    pkg = tmp_path / row["packages"] / "TextEncoder.mlpackage"
    assert row["bytes_text_encoder"] == os.path.getsize(pkg / WEIGHTS)
    fp16 = exp.fp16_packages()
    assert row["size_bytes"] == sum(os.path.getsize(p / WEIGHTS) for c, p in fp16.items()
                                    if c != "text_encoder") + row["bytes_text_encoder"]
    assert 0 < row["size_ratio"] < 1 and "coreml_predict" not in row
    te = package_sizes(pkg)
    assert row["lut_count"] == te.lut_count > 0
    assert row["bits_per_weight"] == round(8 * te.weight_bin_bytes / te.n_weights, 4)
    # the token embedding (vocabulary rows) is not divisible by 16: listed with the reason, stored fp16
    skipped = {u["torch_name"]: u for u in row["uncompressed"]}
    emb = skipped["embeddings.token_embedding.weight"]
    assert emb["kind"] == "channels_not_divisible" and "not divisible by group_size 16" in emb["reason"]
    assert row["uncompressed_by_reason"]["channels_not_divisible"]["layers"] >= 1
    assert row["uncompressed_by_reason"]["not_a_weight"]["layers"] == 1  # the causal mask, counted not listed
    assert [p["prompt"] for p in row["per_prompt"]] == list(exp.settings.prompts)
    for m in ("psnr", "ssim", "clip_image_image", "clip_text_image"):
        assert np.isfinite(row[m]), m
    assert 0 < row["ssim"] < 1 and row["psnr"] > 10
    assert images.shape == exp.baseline.shape and not np.array_equal(images, exp.baseline)
    json.dumps(row)  # serialisable as is

    # deterministic: the same recipe in another folder gives the same bytes and images
    v2 = other(exp, tmp_path / "again").run(recipe)
    assert np.array_equal(images, v2.images) and not v2.reused
    assert (pkg / WEIGHTS).read_bytes() == (tmp_path / "again" / v2.row["packages"] / "TextEncoder.mlpackage"
                                            / WEIGHTS).read_bytes()
    errors = layer_errors(fp16["text_encoder"], pkg)
    changed = errors[errors["changed"]]
    assert len(changed) == row["sizes"]["text_encoder"]["n_compressed"]
    assert (changed["snr_db"] > 5).all() and (changed["rel_rmse"] < 0.5).all()
    assert not errors.set_index("torch_name").loc["embeddings.token_embedding.weight", "changed"]


@pytest.mark.slow
def test_a_labelled_run_of_a_measured_recipe_gets_its_own_row(exp, tmp_path):
    e = other(exp, tmp_path)
    r = Recipe(nbits=4, components=TE)
    first = e.run(r)
    with hooks.on("variant_compressed", lambda name: pytest.fail("measured twice")):
        twin = e.run(r, label="greedy 4-bit", columns=dict(method="greedy"))
    assert twin.reused and twin.row["same_as"] == first.name and twin.row["method"] == "greedy"
    assert twin.name == "km4-pt-te [greedy 4-bit]" and twin.row["psnr"] == first.row["psnr"]
    assert len(e.results()) == 2


@pytest.fixture(scope="module")
def swept(exp, tmp_path_factory):
    """A finished two-variant sweep (per-tensor 4-bit, grouped 2-bit) in its own run folder."""
    out = tmp_path_factory.mktemp("swept")
    e = other(exp, out)
    return out, e.sweep([Recipe(nbits=4, components=TE), Recipe(nbits=2, group_size=16, components=TE)])


@pytest.mark.slow
def test_plots(exp, swept):
    import matplotlib.pyplot as plt

    from sdwork.report import plots

    run, df = swept
    fig = plots.size_vs_metrics(df)
    assert len(fig.axes) == 4
    assert plots.pareto_front(df, "size_bytes", "psnr").any()
    fig2 = plots.image_grid(run, ["km4-pt-te", "km2-g16-te"])
    assert len(fig2.axes) == 3 * len(exp.baseline)
    fig3 = plots.layer_errors(layer_errors(exp.fp16_packages()["text_encoder"],
                                           run / "variants" / "km2-g16-te" / "TextEncoder.mlpackage"))
    assert fig3.axes[0].patches
    plt.close("all")


def _assert_mask_kept_dense(layers: list[dict], sizes) -> None:
    """The causal mask (a const, no weight) stays fp16 and is reported as such."""
    masks = [u for u in layers if u["kind"] == "not_a_weight"]
    assert [u["shape"] for u in masks] == [[1, 1, 77, 77]] and masks[0]["torch_name"] is None
    assert "not a module weight" in masks[0]["reason"]
    assert not any(l.compressed for l in sizes.layers if l.name == masks[0]["name"])


def test_pareto_front():
    from sdwork.report.plots import pareto_front

    df = pd.DataFrame(dict(size_bytes=[1, 2, 3, 3, 4], psnr=[10, 20, 15, 30, 30]))
    assert list(pareto_front(df)) == [True, True, False, True, False]


@pytest.mark.slow
def test_engines(exp, tmp_path):
    r = Recipe(nbits=4, components=TE, engine="sdwork")
    fast = compress(r, exp.fp16_packages(), tmp_path / "fast", progress=False)
    ref = compress(r.with_(engine="coremltools"), exp.fp16_packages(), tmp_path / "ref", progress=False)
    a, b = fast.sizes["text_encoder"], ref.sizes["text_encoder"]
    assert a.weight_bin_bytes == b.weight_bin_bytes and a.lut_count == b.lut_count  # same layout
    _assert_mask_kept_dense(uncompressed_layers(fast, exp.weight_maps()), a)


@pytest.mark.slow
def test_torch_engine(exp, tmp_path):
    r = Recipe(nbits=4, components=TE, engine="torch")
    done = compress(r, exp.fp16_packages(), tmp_path, pipe=exp.pipe, progress=False)
    s = done.sizes["text_encoder"]
    assert s.lut_count > 0 and s.weight_bin_bytes < package_sizes(exp.fp16_packages()["text_encoder"]).weight_bin_bytes
    # the causal-mask constant is no module weight: every engine leaves it, and says so
    _assert_mask_kept_dense(uncompressed_layers(done, exp.weight_maps()), s)
    ev = evaluate(exp.pipe, done.packages, exp.settings, exp.baseline, None, progress=False)
    assert 10 < ev.means["psnr"] < float("inf")


@pytest.mark.slow
def test_cli(exp, swept, tmp_path, capsys):
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
    assert main(["sizes", str(exp.fp16_packages()["unet"])]) == 0
    assert "weight_bin_bytes=" in capsys.readouterr().out
    assert main(["sweep", "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "no grid file" in capsys.readouterr().err


def test_a_run_folder_holds_one_setup(exp, tmp_path):
    e = other(exp, tmp_path)
    e._claim()
    e._claim()  # same setup: fine (more recipes may be added)
    steps = other(exp, tmp_path)
    steps.settings = GenSettings.from_dict({**GRID["generation"], "steps": 3})
    with pytest.raises(MismatchError, match=r"steps.*2.*3.*new folder"):
        steps._claim()
    retrained = other(exp, tmp_path)
    retrained.weights_hash = "retrained"
    with pytest.raises(MismatchError, match="weights_hash"):
        retrained._claim()
    rescored = other(exp, tmp_path)
    rescored.scorer_hash = "clip2"  # a retrained CLIP scorer: old rows are not comparable
    with pytest.raises(MismatchError, match="scorer_hash"):
        rescored._claim()


def test_grid_files_expand_and_override():
    g = grids.load_grid(GRID)
    assert [r.name for r in g.recipes] == ["km4-pt-te", "km4-g16-te", "km2-pt-te", "km2-g16-te"]
    assert g.settings == SETTINGS and g.model == "tiny-random" and g.scorer == "tiny-random"
    g = grids.load_grid("ci", engine="coremltools", components=TE, scorer=None, limit=1)
    assert [r.name for r in g.recipes] == ["km2-pt-te"] and g.scorer is None
    assert load_results(grids.grid_path("ci").parent).empty  # no results file there: an empty table


@pytest.mark.slow
def test_a_failed_variant_gets_a_failed_row_and_a_rerun_retries_it(exp, tmp_path):
    from sdwork.errors import EngineError

    e = other(exp, tmp_path)
    recipes = [Recipe(nbits=4, components=TE), Recipe(nbits=2, components=TE)]

    def fail_second(name):
        if name == "km2-pt-te":
            raise EngineError("simulated engine failure; use another engine")

    with hooks.on("variant_compressed", fail_second):
        df = e.sweep(recipes)
    assert list(df["status"]) == ["ok", "failed"] and "simulated engine failure" in df["error"].iloc[1]
    assert not (tmp_path / "variants" / "km2-pt-te").exists() and not (tmp_path / "images" / "km2-pt-te.npz").exists()
    assert list(e.results()["name"]) == ["km4-pt-te"]  # failed rows are not results
    df = e.sweep(recipes)  # the rerun retries the failed variant only
    assert list(df["status"]) == ["ok", "ok"] and list(e.results()["name"]) == ["km4-pt-te", "km2-pt-te"]

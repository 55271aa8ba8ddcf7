"""Mixed-bit allocation: synthetic sensitivity tables (exact answers known), then a real
tiny-random UNet recipe through conversion and Experiment.run (exact sizes, exact weights),
and the whole study."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from sdwork import hooks
from sdwork.compress.recipe import LayerSpec, Recipe
from sdwork.errors import ConfigError
from sdwork.experiments import mixedbit as mb
from sdwork.experiments.sensitivity import FP16, Layer, candidate_name

BITS = (2, 3, 4, 6, 8)


def synthetic_table(sens: dict[str, float], shapes: dict[str, tuple], bits=BITS, group=None) -> pd.DataFrame:
    """Layer l at n bits drifts sens[l] * 4^-n (the error of n-bit quantization scales like 2^-2n)."""
    rows = []
    for name, s in sens.items():
        layer = Layer(name, shapes[name])
        for n in bits:
            spec = LayerSpec(n, group_size=group)
            mse = s * 4.0**-n
            rows.append(dict(layer=name, candidate=candidate_name(spec), bytes=layer.nbytes(spec),
                             fp16_bytes=layer.nbytes(None), numel=layer.numel, latent_mse=mse, image_mse=mse * 100,
                             latent_psnr=-10 * math.log10(mse)))
    return pd.DataFrame(rows)


def random_options(rng, n_layers=4) -> dict[str, list[mb.Option]]:
    out = {}
    for i in range(n_layers):
        size = int(rng.integers(1, 40)) * 1000
        drift = np.sort(rng.random(4))[::-1] * rng.random() * 10
        opts = [mb.Option(f"{b}-pt", size * b // 16, float(d)) for b, d in zip((2, 3, 4, 6), drift)]
        out[f"l{i}"] = opts + [mb.Option(FP16, size, 0.0)]
    return out


def brute_force(options, budget) -> float:
    best = math.inf
    for combo in itertools.product(*options.values()):
        if sum(o.bytes for o in combo) <= budget:
            best = min(best, sum(o.drift for o in combo))
    return best


# --- greedy -------------------------------------------------------------------------


def test_lower_hull_drops_dominated_and_concave_points():
    opts = [mb.Option("a", 100, 0.0), mb.Option("b", 80, 1.0), mb.Option("c", 60, 5.0),
            mb.Option("d", 50, 5.5), mb.Option("e", 70, 9.0), mb.Option("f", 40, 20.0)]
    hull = mb.lower_hull(opts)
    assert [o.candidate for o in hull] == ["a", "b", "d", "f"]  # e dominated, c above the chord b-d
    slopes = [(hull[k + 1].drift - hull[k].drift) / (hull[k].bytes - hull[k + 1].bytes) for k in range(len(hull) - 1)]
    assert slopes == sorted(slopes)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_is_optimal_at_its_own_size(seed):
    """Lagrangian optimality: the greedy state (before spending slack) has the least drift of any
    allocation of at most its size; with the slack spent it is never worse and still fits."""
    rng = np.random.default_rng(seed)
    options = random_options(rng)
    full = sum(o[-1].bytes for o in options.values())
    budget = int(full * rng.uniform(0.2, 0.6))
    no_slack = mb.greedy(options, budget_bytes=budget, spend_slack=False)
    assert no_slack.bytes <= budget
    assert no_slack.predicted_drift == pytest.approx(brute_force(options, no_slack.bytes))
    with_slack = mb.greedy(options, budget_bytes=budget)
    assert with_slack.bytes <= budget
    assert with_slack.predicted_drift <= no_slack.predicted_drift + 1e-12


def test_greedy_max_drift_respects_budget_and_uses_it():
    rng = np.random.default_rng(3)
    options = random_options(rng, 5)
    for limit in (0.0, 0.5, 3.0, 100.0):
        a = mb.greedy(options, max_drift=limit)
        assert a.predicted_drift <= limit + 1e-12
    assert mb.greedy(options, max_drift=0.0).histogram() == {FP16: 5}
    assert set(mb.greedy(options, max_drift=1e9).choice.values()) == {"2-pt"}


def test_greedy_errors_name_the_fix():
    options = random_options(np.random.default_rng(0))
    with pytest.raises(ValueError, match="smallest possible allocation"):
        mb.greedy(options, budget_bytes=10)
    with pytest.raises(ValueError, match="exactly one"):
        mb.greedy(options)


def test_greedy_spends_bits_where_they_matter():
    """Two equal layers, one 1000x more sensitive: at 4 bits on average, the sensitive one gets more."""
    shapes = {"calm": (128, 128, 3, 3), "touchy": (128, 128, 3, 3)}
    table = synthetic_table({"calm": 1.0, "touchy": 1000.0}, shapes)
    options = mb.layer_options(table, allow_fp16=False)
    uni = mb.uniform(options, "4-pt")
    a = mb.greedy(options, budget_bytes=uni.bytes)
    assert a.bytes <= uni.bytes
    assert a.choice["touchy"] > a.choice["calm"]  # '6-pt' > '3-pt' (same digits count)
    assert a.predicted_drift < 0.5 * uni.predicted_drift


# --- Apple --------------------------------------------------------------------------


def additive_cumulative(table: pd.DataFrame) -> pd.DataFrame:
    """Cumulative pass of an additive world: layers added by ascending drift, PSNR of the running sum."""
    rows = []
    for cand, part in table.groupby("candidate"):
        part = part.sort_values("latent_mse", kind="stable")
        total = 0.0
        for k, r in enumerate(part.itertuples()):
            total += r.latent_mse
            rows.append(dict(candidate=cand, position=k, layer=r.layer, latent_psnr=-10 * math.log10(total)))
    return pd.DataFrame(rows)


def three_layers():
    shapes = {"a": (64, 64, 3, 3), "b": (128, 128, 3, 3), "c": (256, 128)}
    return synthetic_table({"a": 10.0, "b": 1.0, "c": 100.0}, shapes), shapes


def test_apple_takes_the_fewest_bits_above_threshold():
    table, _ = three_layers()
    cum = additive_cumulative(table)
    options = mb.layer_options(table)
    thr = 0.0
    a = mb.apple(options, cum, thr)
    look = {(r.candidate, r.layer): r.latent_psnr for r in cum.itertuples()}
    for layer, cand in a.choice.items():
        passing = [n for n in BITS if look[(f"{n}-pt", layer)] > thr]
        assert cand == (f"{passing[0]}-pt" if passing else FP16)
    assert mb.apple(options, cum, 1e9).histogram() == {FP16: 3}
    assert set(mb.apple(options, cum, -1e9).choice.values()) == {"2-pt"}


def test_apple_for_budget_is_the_highest_threshold_that_fits():
    table, _ = three_layers()
    cum = additive_cumulative(table)
    options = mb.layer_options(table)
    full = sum(o[-1].bytes for o in options.values())
    for frac in (0.2, 0.3, 0.5, 0.8):
        budget = int(full * frac)
        a = mb.apple_for_budget(options, cum, budget)
        assert a.bytes <= budget
        values = sorted(set(cum["latent_psnr"]))
        above = [v for v in values if v > a.threshold]  # above[0]: the value the threshold sits just below
        if len(above) > 1:  # the next threshold up no longer fits
            nxt = float(np.nextafter(above[1], -math.inf))
            assert mb.apple(options, cum, nxt).bytes > budget
    with pytest.raises(ValueError, match="raise the target"):
        mb.apple_for_budget(options, cum, 100)
    with pytest.raises(ValueError, match="cumulative"):
        mb.apple(options, pd.DataFrame(), 0.0)


def test_greedy_beats_apple_when_layer_sizes_differ():
    """Apple's rule ignores how many bytes a layer holds; the greedy prices drift per byte."""
    shapes = {f"small{i}": (64, 64) for i in range(6)} | {"big": (512, 512, 3, 3)}
    sens = {f"small{i}": 50.0 for i in range(6)} | {"big": 20.0}
    table = synthetic_table(sens, shapes)
    options, cum = mb.layer_options(table), additive_cumulative(table)
    budget = mb.uniform(options, "4-pt").bytes
    g, a = mb.greedy(options, budget_bytes=budget), mb.apple_for_budget(options, cum, budget)
    assert g.bytes <= budget and a.bytes <= budget
    assert g.predicted_drift < a.predicted_drift


# --- sizes and recipes --------------------------------------------------------------


def test_size_model_round_trips_bits_and_bytes():
    sm = mb.SizeModel(fixed_bytes=1000, total_weights=80_000)
    b = sm.budget(4.0)
    assert sm.avg_bits(b) <= 4.0 < sm.avg_bits(b + 1)
    assert sm.layer_budget(5000) == 4000


def test_to_recipe_base_is_most_common_and_the_rest_override():
    alloc = mb.Allocation("greedy", {"x": "4-pt", "y": "4-pt", "z": "6-g16", "w": FP16}, 0, 0.0)
    consts = {k: f"p_unet_{k}_weight" for k in "xyzw"}
    r = mb.to_recipe(alloc, consts, rest_consts=["p_unet_other_weight"])
    assert isinstance(r, Recipe) and (r.nbits, r.granularity) == (4, "per_tensor")
    assert r.components == ("unet",) and r.engine == "sdwork"
    assert dict(r.overrides) == {"p_unet_z_weight": LayerSpec(6, group_size=16),
                                 "p_unet_w_weight": None, "p_unet_other_weight": None}
    assert r.min_target == "iOS18" and "-ov3-" in r.name
    assert Recipe.from_json(r.to_json()) == r
    assert mb.to_recipe(alloc, consts, rest_consts=["p_unet_other_weight"], rest=LayerSpec(4)).overrides == tuple(
        sorted({"p_unet_z_weight": LayerSpec(6, group_size=16), "p_unet_w_weight": None}.items()))
    with pytest.raises(ValueError, match="every layer"):
        mb.to_recipe(mb.Allocation("greedy", {"x": FP16}, 0, 0.0), consts)


def test_const_names_accept_both_key_styles():
    wm = {"conv_in.weight": "p_unet_conv_in_weight", "unet.conv_out.weight": "p_unet_conv_out_weight"}
    assert mb.const_names(["conv_in", "conv_out"], wm) == {"conv_in": "p_unet_conv_in_weight",
                                                          "conv_out": "p_unet_conv_out_weight"}
    with pytest.raises(KeyError, match="weight map"):
        mb.const_names(["nope"], wm)


def test_hand_made_allocation_is_checked():
    table, _ = three_layers()
    options = mb.layer_options(table)
    a = mb.allocation(options, {"a": "2-pt", "b": FP16, "c": "8-pt"})
    assert a.bytes == sum(o.bytes for l, c in a.choice.items() for o in options[l] if o.candidate == c)
    with pytest.raises(ValueError, match="every analysed layer"):
        mb.allocation(options, {"a": "2-pt"})
    with pytest.raises(ValueError, match="measured candidate"):
        mb.allocation(options, {"a": "5-pt", "b": FP16, "c": "8-pt"})


def test_layer_options_validates():
    table, _ = three_layers()
    with pytest.raises(ValueError, match="objective"):
        mb.layer_options(table, "psnr")
    with pytest.raises(ValueError, match="empty"):
        mb.layer_options(pd.DataFrame())
    opts = mb.layer_options(table, "image_mse")
    assert all(o[-1].candidate == FP16 and o[-1].drift == 0 for o in opts.values())


# --- a real recipe on the tiny-random UNet --------------------------------------------


GEN = dict(prompts=("a small green circle on a black background",), seeds=(0,), steps=2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from sdwork import Experiment, GenSettings
    from sdwork.experiments import sensitivity as S

    folder = tmp_path_factory.mktemp("mixed")
    exp = Experiment("tiny-random", GenSettings(**GEN), scorer=None, out=folder / "exp", progress=False)
    probe = S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], seeds=(0,), steps=1)
    # conv_out holds the package's final blob (not padded to 64 bytes): the size model must know
    cfg = S.SensitivityConfig(model="tiny-random", probe=probe, nbits=(3, 8), group_sizes=(None, 16),
                              only_layers=("conv_in", "time_embedding.linear_2", "down_blocks.0.resnets.0.conv1",
                                           "down_blocks.1.attentions.0.proj_in", "conv_out"))
    sens = S.Sensitivity(cfg, folder / "sens", pipe=exp.pipe, progress=False)
    table = sens.run()
    # the cache of converted fp16 packages (shared with the sweep and notebook tests)
    pkg = exp.fp16_packages(("unet",))["unet"]
    consts = mb.const_names([l.module for l in sens.layers], exp.weight_maps(("unet",))["unet"])
    return sens, table, pkg, consts, folder, exp


@pytest.mark.slow
def test_recipe_package_matches_prediction_to_the_byte_and_bit(converted):
    """The allocation's size is the package's size; every palettized weight in the package is the
    one measured in torch (analysed layers as allocated, the others as `rest`), so the package's
    drift is exactly the drift measured in torch."""
    import copy

    from sdwork.experiments import sensitivity as S
    from sdwork.compress.apply import compress
    from sdwork.convert import load_packages_into_pipeline, load_weight_map, package_weights

    sens, table, pkg, consts, folder, _ = converted
    rest = LayerSpec(3, group_size=128)  # the 64-channel layers cannot take it: they stay fp16
    sizes = mb.size_model(pkg, consts, rest)
    assert sizes.last_layer == "conv_out"
    options = mb.layer_options(table, last_layer=sizes.last_layer)
    alloc = mb.allocation(options, {"conv_in": "fp16", "time_embedding.linear_2": "8-g16", "conv_out": "3-pt",
                                    "down_blocks.0.resnets.0.conv1": "3-g16", "down_blocks.1.attentions.0.proj_in": "8-pt"})
    recipe = mb.recipe_for(alloc, consts, pkg, engine="sdwork", rest=rest)
    done = compress(recipe, {"unet": pkg}, folder / "variant", progress=False)
    assert done.sizes["unet"].weight_bin_bytes == sizes.fixed_bytes + alloc.bytes

    # what torch should hold: the allocation, and `rest` wherever the engine can apply it
    module_of = {c: p.removesuffix(".weight") for p, c in load_weight_map(pkg).items()}
    expect = {sens.layer(m): sens.palettized(sens.layer(m), s) for m, s in alloc.specs().items() if s is not None}
    others = [S.Layer(module_of[c], tuple(sens.module.get_submodule(module_of[c]).weight.shape))
              for c in mb.other_consts(pkg, consts.values())]
    assert any(not l.supports(rest) for l in others)  # conv_out: 4 channels, stays fp16
    for l in others:
        if l.supports(rest):
            expect[l] = S.palettize_dense(sens.module.get_submodule(l.module).weight.detach().numpy(), rest)
    weights = package_weights(done.packages["unet"])
    for layer, dense in expect.items():
        assert np.array_equal(weights[consts.get(layer.module) or recipe_const(layer)].reshape(layer.shape), dense)
    compressed = {l.name for l in done.sizes["unet"].layers if l.compressed}
    assert compressed == {consts.get(l.module) or recipe_const(l) for l in expect}  # nothing else touched
    variant = load_packages_into_pipeline(copy.deepcopy(sens.pipe), done.packages)
    assert S.drift(sens.reference, S.run_probe(variant, sens.config.probe)) == sens.measure(expect)


def recipe_const(layer) -> str:
    """The converter's const name of a UNet weight (REFERENCE.md: p_<attr>_<param>_to_fp16)."""
    return "p_unet_" + layer.param.replace(".", "_") + "_to_fp16"


@pytest.mark.slow  # the module fixture: a sensitivity analysis and the fp16 packages
def test_psnr_target_is_met_by_measurement(converted):
    sens, table, *_ = converted
    options = mb.layer_options(table)
    assert mb.greedy(options, budget_bytes=sum(o[-1].bytes for o in options.values()) // 3).bytes > 0
    loosest = mb.measure(sens, mb.greedy(options, max_drift=1e9))["latent_psnr"]
    target = loosest + 6.0
    alloc, got = mb.greedy_for_psnr(sens, options, target, tries=4)
    assert got["latent_psnr"] >= target
    assert got == mb.measure(sens, alloc)
    assert alloc.extra["target"] == target


@pytest.mark.slow
def test_a_mixed_recipe_equal_to_a_uniform_one_still_gets_its_own_row(converted):
    """Every analysed layer and the rest at 8-pt is the uniform 8-bit recipe: its labelled row is
    written (same_as names the uniform row) from the one measurement, and a rerun writes nothing."""
    from sdwork.experiments.results import rows

    sens, table, pkg, consts, folder, exp = converted
    uniform = mb.uniform_recipe(8)
    recipe = mb.recipe_for(mb.uniform(mb.layer_options(table), "8-pt"), consts, pkg, rest=LayerSpec(8))
    assert recipe == uniform
    entries = [(uniform, dict(method="uniform")),
               (recipe, dict(method="greedy", objective="latent_mse", target="8-bit"))]
    measured = []
    with hooks.on("variant_compressed", lambda name: measured.append(name)):
        df = mb.add_rows(exp, entries, progress=False)
    assert measured == [uniform.name]  # compressed and scored once
    u, g = df.iloc[0], df.iloc[1]
    assert u["name"] == uniform.name and u["method"] == "uniform" and pd.isna(u.get("same_as"))
    assert g["name"] == f"{uniform.name} [greedy latent_mse 8-bit]" and g["same_as"] == uniform.name
    assert g["method"] == "greedy" and g["psnr"] == u["psnr"] and g["images"] == u["images"]
    written = rows(exp.out)
    assert [r["name"] for r in written] == [u["name"], g["name"]]
    with hooks.on("variant_compressed", lambda name: measured.append(name)):
        again = mb.add_rows(exp, entries, progress=False)
    assert measured == [uniform.name] and len(rows(exp.out)) == 2
    assert list(again["key"]) == list(df["key"])


def test_row_labels():
    assert mb.row_label(dict(method="uniform")) is None
    assert mb.row_label(dict(method="apple", objective="image_mse", target="4-bit")) == "apple 4-bit"
    assert mb.row_label(dict(method="greedy", objective="image_mse", target="4-bit")) == "greedy image_mse 4-bit"


def test_study_settings_are_checked_before_any_work(tmp_path):
    from types import SimpleNamespace

    from sdwork.experiments.sensitivity import SensitivityConfig

    exp = SimpleNamespace(model="tiny-random", out=tmp_path)  # validation comes before any use of it
    cfg = SensitivityConfig(model="tiny-random")
    for kw, match in [(dict(methods=["greedy", "magic"]), "methods"), (dict(objective="psnr"), "objective"),
                      (dict(match_bits=[5]), "match_bits"), (dict(match_bits=4), "match_bits"),
                      (dict(curve_bits=[0.5]), "curve_bits"), (dict(match_group=0), "match_group")]:
        with pytest.raises(ConfigError, match=match):
            mb.study(exp, cfg, **kw)
    with pytest.raises(ConfigError, match="sensitivity must be a SensitivityConfig"):
        mb.study(exp, dict(nbits=(2, 8)))
    assert not (exp.out / "sensitivity.json").exists()


@pytest.mark.slow
def test_study_writes_uniform_and_mixed_rows_and_a_rerun_measures_nothing(converted, tmp_path):
    """The whole study on the tiny-random UNet: uniform 4-bit, the analysis of 3 layers, Apple's
    pass, the curve, greedy and Apple recipes no larger than uniform 4-bit; then the same call again."""
    from sdwork import Experiment, GenSettings
    from sdwork.experiments import sensitivity as S
    from sdwork.experiments.results import rows

    *_, base = converted
    exp = Experiment("tiny-random", GenSettings(**GEN), scorer=None, out=tmp_path / "study", pipe=base.pipe,
                     progress=False)
    probe = S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], seeds=(0,), steps=1)
    cfg = S.SensitivityConfig(model="not-this-one", probe=probe, nbits=(2, 8), group_sizes=(None,), max_layers=3)
    kw = dict(match_bits=[4], match_group=None, curve_bits=[3.0, 6.0], progress=False)
    st = mb.study(exp, cfg, **kw)
    res = st.results
    assert list(res["method"]) == ["uniform", "greedy", "apple"]
    assert res["name"].iloc[0] == "km4-pt-unet-sdwork"
    assert list(res["label"].iloc[1:]) == ["greedy image_mse 4-bit", "apple 4-bit"]
    mixed, uniform = res.iloc[1:], res.iloc[0]
    assert (mixed["bytes_unet"] <= uniform["bytes_unet"]).all()
    assert (mixed["predicted_bytes"] == mixed["bytes_unet"]).all()  # the exact size model, on the package
    assert st.layers == 3 and len(st.sensitivity) == 3 * 2
    assert (exp.out / S.CONFIG).exists() and (exp.out / S.SINGLE).exists()
    assert set(st.cumulative["candidate"]) == {"2-pt", "8-pt"}
    assert set(st.curve["method"]) == {"greedy", "apple", "uniform"}
    assert pd.read_csv(exp.out / mb.CURVE).shape[0] == len(st.curve)
    assert set(st.seconds) == {"uniform", "sensitivity", "curve", "mixed"}
    written = len(rows(exp.out))
    measured = []
    with hooks.on("variant_compressed", lambda name: measured.append(name)):
        again = mb.study(exp, cfg, **kw)
    assert measured == [] and len(rows(exp.out)) == written
    assert list(again.results["key"]) == list(res["key"])
    assert again.sensitivity.equals(st.sensitivity)

"""Recipe validation, serialisation, naming and coremltools configs; grid files."""
import pytest

from sdwork.compress.recipe import Recipe, grid
from sdwork.errors import ConfigError
from sdwork.experiments.grids import expand, load_grid
from sdwork.paths import GRIDS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nbits=5), "nbits=5 is not supported"),
        (dict(nbits=True), "nbits=True"),
        (dict(nbits=4, granularity="per_channel"), "granularity must be one of"),
        (dict(nbits=4, granularity="per_tensor", group_size=16), "only applies to granularity='per_grouped_channel'"),
        (dict(nbits=4.0), r"nbits=4.0 is not supported.*whole number"),
        (dict(nbits=4, engine="sdwork", group_size=16, cluster_dim=2), "engine='sdwork' does not do vector"),
        (dict(nbits=4, granularity="per_grouped_channel"), "needs group_size"),
        (dict(nbits=4, granularity="per_grouped_channel", group_size=0), "positive number"),
        (dict(nbits=4, granularity="per_grouped_channel", group_size=-4), "positive number"),
        (dict(nbits=4, granularity="per_grouped_channel", group_size=6, cluster_dim=4), "cluster_dim=4 must divide group_size=6"),
        (dict(nbits=4, cluster_dim=0), "cluster_dim must be >= 1, got 0"),
        (dict(nbits=4, cluster_dim=2, mode="uniform"), "needs mode='kmeans'"),
        (dict(nbits=4, mode="linear"), "mode must be one of"),
        (dict(nbits=4, weight_threshold=-1), "weight_threshold"),
        (dict(nbits=4, components=("unet", "safety_checker")), r"components\[1\] must be one of .*got 'safety_checker'"),
        (dict(nbits=4, components=()), "components is empty"),
        (dict(nbits=4, engine="onnx"), "engine must be one of"),
        (dict(nbits=4, engine="torch", mode="uniform"), "only does k-means"),
        (dict(nbits=4, overrides={"w": (5, "per_tensor", None)}), "override: nbits=5"),
        (dict(nbits=4, overrides={"w": "fp16"}), "must be None"),
    ],
)
def test_invalid_recipes_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        Recipe(**kwargs)
    assert isinstance(e.value, ValueError)  # callers catching ValueError keep working


def test_group_size_implies_grouped_channels():
    r = Recipe(nbits=4, group_size=16)
    assert r.granularity == "per_grouped_channel" and r.name == "km4-g16"
    assert r == Recipe(nbits=4, granularity="per_grouped_channel", group_size=16)
    assert Recipe(nbits=4).granularity == "per_tensor"
    assert Recipe.from_dict({"nbits": 4, "group_size": 16}) == r
    assert r.to_coreml_config().global_config.granularity.name == "PER_GROUPED_CHANNEL"


def test_json_round_trip_and_equality():
    r = Recipe(nbits=3, granularity="per_grouped_channel", group_size=16, cluster_dim=2, weight_threshold=4096,
               components=["unet"], overrides={"p_b": None, "p_a": (8, "per_tensor", None)})
    back = Recipe.from_json(r.to_json())
    assert back == r and back.name == r.name and hash(back) == hash(r)
    assert back.overrides[0][0] == "p_a"  # sorted, so the name does not depend on dict order


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"recipe: unknown key.*'bits' \(did you mean 'nbits'\?\)"):
        Recipe.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="needs nbits"):
        Recipe.from_dict({"granularity": "per_tensor"})


def test_names_are_short_stable_and_unique():
    assert Recipe(nbits=4).name == "km4-pt"
    assert Recipe(nbits=2, granularity="per_grouped_channel", group_size=16).name == "km2-g16"
    assert Recipe(nbits=8, mode="uniform", engine="sdwork", components=("unet",)).name == "un8-pt-unet-sdwork"
    recipes = grid()
    assert len(recipes) == 20 and len({r.name for r in recipes}) == 20
    # components are ordered canonically, so the same set gives the same name
    assert Recipe(nbits=4, components=("unet", "text_encoder")) == Recipe(nbits=4)


def test_min_target():
    assert Recipe(nbits=4).min_target == "iOS16"
    assert Recipe(nbits=3).min_target == "iOS18"
    assert Recipe(nbits=4, granularity="per_grouped_channel", group_size=4).min_target == "iOS18"
    assert Recipe(nbits=4, overrides={"x": (4, "per_grouped_channel", 8)}).min_target == "iOS18"


def test_coreml_config():
    r = Recipe(nbits=6, granularity="per_grouped_channel", group_size=16, weight_threshold=100,
               overrides={"p_skip": None, "p_eight": (8, "per_tensor", None)})
    cfg = r.to_coreml_config()
    g = cfg.global_config
    assert (g.nbits, g.group_size, g.weight_threshold, g.mode, g.cluster_dim) == (6, 16, 100, "KMEANS", 1)
    assert g.granularity.name == "PER_GROUPED_CHANNEL"
    assert cfg.op_name_configs["p_skip"] is None
    assert cfg.op_name_configs["p_eight"].nbits == 8


def test_torch_config_skips_small_modules():
    cfg = Recipe(nbits=4, engine="torch").to_torch_config(skip_modules=("conv_out",))
    assert cfg.global_config.n_bits == 4 and cfg.module_name_configs == {"conv_out": None}


def test_grid_files():
    default = load_grid(GRIDS / "default.yaml")
    assert len(default.recipes) == 20
    assert {(r.nbits, r.group_size) for r in default.recipes} == {
        (n, g) for n in (2, 3, 4, 6, 8) for g in (None, 4, 16, 64)}
    assert default.settings.threads == 1
    ci = load_grid(GRIDS / "ci.yaml", model="tiny-random", engine="coremltools")
    assert ci.model == "tiny-random" and all(r.engine == "coremltools" for r in ci.recipes)


def test_grid_errors():
    gen = {"prompts": ["a"], "seeds": [0]}
    with pytest.raises(ValueError, match="grid: unknown key.*'bits'"):
        load_grid({"generation": gen, "grid": {"nbits": [4]}, "bits": 3})
    with pytest.raises(ValueError, match="nbits=7"):
        load_grid({"generation": gen, "grid": {"nbits": [4, 7]}})
    with pytest.raises(ConfigError, match="no grid file"):
        load_grid("nowhere.yaml")


def test_a_grid_without_recipes_says_so():
    with pytest.raises(ConfigError, match="defines no recipe"):
        load_grid({"generation": {"prompts": ["a"], "seeds": [0]}})


def test_expand_dedupes_and_mixes_fields():
    rs = expand({"nbits": [4, 4], "group_size": [None, 8], "cluster_dim": [1, 2]}, engine="coremltools")
    names = [r.name for r in rs]
    assert len(names) == len(set(names))
    # per-tensor with cluster_dim 2 is allowed; grouped 8 with cluster_dim 2 too
    assert "km4-g8-cd2" in names and "km4-pt-cd2" in names

"""Bad input gets a clear, early error naming the problem and the fix, and writes nothing."""
import shutil

import pytest

from sdwork import Experiment, GenSettings, Recipe
from sdwork.cli import main
from sdwork.errors import ConfigError, ModelNotFoundError, PackageError, SdworkError
from sdwork.experiments.grids import load_grid
from sdwork.load import load_pipeline

GEN = dict(prompts=["a small red circle on a gray background"], seeds=[0], steps=2)
GRID = dict(model="tiny-random", engine="sdwork", components=["text_encoder"], scorer=None, generation=GEN,
            grid=dict(nbits=[4]))


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("kw, message", [
    (dict(prompts="a small red circle"), r"prompts must be a list.*write prompts=\["),
    (dict(seeds=3), r"seeds must be a list, got 3.*write seeds=\[0, 1\]"),
    (dict(steps="four"), r"steps must be a whole number, got 'four'"),
    (dict(steps=0), r"steps must be from 1 to 1000, got 0"),
    (dict(seeds=[0, 0]), r"seeds lists 0 twice"),
    (dict(guidance=float("nan")), r"guidance must be a finite number"),
    (dict(height=70), r"height=70 is not a multiple of 8"),
    (dict(threads=True), r"threads must be a whole number, got True"),
])
def test_generation_settings_name_the_field_value_and_fix(kw, message):
    with pytest.raises(ConfigError, match=message):
        GenSettings(**{**GEN, **kw})


def test_a_typo_in_the_generation_section_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'prompt' \(did you mean 'prompts'\?\)"):
        load_grid({**GRID, "generation": {"prompt": ["x"], "seeds": [0]}})


@pytest.mark.parametrize("kw, message", [
    (dict(nbits=4.0), r"nbits=4.0 is not supported.*whole number"),
    (dict(nbits=5), r"nbits=5 is not supported"),
    (dict(nbits=4, granularity="per_tensor", group_size=16), r"group_size=16 only applies to.*per_grouped_channel"),
    (dict(nbits=4, engine="sdwork", cluster_dim=2, group_size=16), r"engine='sdwork' does not do vector"),
    (dict(nbits=4, components="unet "), r"components\[0\] must be one of"),
    (dict(nbits=4, mode="kmean"), r"did you mean 'kmeans'"),
])
def test_recipes_are_checked_when_built(kw, message):
    with pytest.raises(ConfigError, match=message):
        Recipe(**kw)


def test_group_size_implies_grouped_luts():
    assert Recipe(nbits=4, group_size=16).granularity == "per_grouped_channel"
    assert Recipe(nbits=4).granularity == "per_tensor"
    assert Recipe(nbits=4, group_size=16) == Recipe(nbits=4, granularity="per_grouped_channel", group_size=16)


@pytest.mark.parametrize("limit", ["-1", "0", "two"])
def test_cli_limit_must_be_a_positive_number(limit, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--grid", "ci", "--out", str(tmp_path / "run"), "--limit", limit])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_out_naming_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("x")
    assert main(["sweep", "--grid", "ci", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert "names an existing file" in err and "pass a folder" in err and "Traceback" not in err


def test_cli_bad_grid_value_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    import yaml

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "generation": {**GEN, "steps": "four"}}))
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps must be a whole number, got 'four'" in err
    assert main(["--debug", "sweep", "--grid", str(grid), "--out", str(tmp_path / "run")]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert files_under(tmp_path / "run") == []


def test_a_recipe_that_fits_no_layer_fails_before_any_file(tmp_path):
    exp = Experiment("tiny-random", GenSettings(**GEN), None, tmp_path / "run", progress=False)
    for recipe, what in ((Recipe(nbits=4, group_size=7, components=("unet",)), "group_size=7"),
                         (Recipe(nbits=4, cluster_dim=3, components=("unet",)), "cluster_dim=3")):
        with pytest.raises(ConfigError, match=rf"{what} divides the output channels of no layer of unet.*e\.g\. one of"):
            exp.run(recipe)
        with pytest.raises(ConfigError, match=what):
            exp.sweep([Recipe(nbits=4, components=("unet",)), recipe])  # checked before the first variant runs
    assert files_under(tmp_path / "run") == []


def test_run_takes_recipes_only(tmp_path):
    exp = Experiment("tiny-random", GenSettings(**GEN), None, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="run\\(\\) takes a sdwork.Recipe"):
        exp.run({"nbits": 4})
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        exp.sweep([Recipe(nbits=4)], limit=0)
    assert files_under(tmp_path / "run") == []


def test_damaged_weights_name_the_file_and_the_fix(tmp_path):
    pipe = load_pipeline("tiny-random", progress=False)
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    unet = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ModelNotFoundError, match=r"diffusion_pytorch_model.safetensors is damaged.*download or save_pretrained"):
        load_pipeline(tmp_path / "m")
    unet.write_bytes(bytes(range(256)) * 64)  # random bytes
    with pytest.raises(ModelNotFoundError, match="is damaged"):
        load_pipeline(tmp_path / "m")


def test_sizes_of_a_truncated_package_is_a_clear_error(tmp_path, capsys):
    from sdwork.convert.export import convert_pipeline
    from sdwork.coreml.sizes import WEIGHTS, package_sizes

    pipe = load_pipeline("tiny-random", progress=False)
    pkg = convert_pipeline(pipe, tmp_path, components=("text_encoder",), progress=False)["text_encoder"]
    shutil.copytree(pkg, tmp_path / "cut.mlpackage")
    w = tmp_path / "cut.mlpackage" / WEIGHTS
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(PackageError, match="truncated|re-create|blobs end"):
        package_sizes(tmp_path / "cut.mlpackage")
    assert main(["sizes", str(tmp_path / "cut.mlpackage")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_every_sdwork_error_is_one_family():
    from sdwork.convert.weightmap import WeightMapError
    from sdwork.coreml.sizes import SizeAccountingError
    from sdwork.tiny.train import StageMismatchError

    for cls in (ConfigError, ModelNotFoundError, PackageError, WeightMapError, SizeAccountingError, StageMismatchError):
        assert issubclass(cls, SdworkError), cls


def test_the_grid_files_and_their_commented_examples_are_valid():
    """Every shipped grid loads, and the extra-recipe example in default.yaml's comment builds
    under that grid's engine defaults (a user copies it)."""
    import yaml

    from sdwork import paths
    from sdwork.experiments.grids import available

    for name in available():
        assert load_grid(name).recipes, name
    text = (paths.GRIDS / "default.yaml").read_text()
    example = text.split("recipes: []", 1)[1].split("e.g.", 1)[1].strip()
    grid = yaml.safe_load(text)
    load_grid({**grid, "recipes": [yaml.safe_load(example)]})


def test_engine_errors_say_the_fix_once(tmp_path):
    """An engine refusal reaching a user names the fix once, not once per layer of wrapping."""
    from sdwork.compress.apply import compress
    from sdwork.convert.export import convert_pipeline
    from sdwork.errors import EngineError

    pipe = load_pipeline("tiny-random", progress=False)
    fp16 = convert_pipeline(pipe, tmp_path / "fp16", components=("text_encoder",), progress=False)
    r = Recipe(nbits=4, components=("text_encoder",), engine="sdwork")
    object.__setattr__(r, "cluster_dim", 2)  # past the Recipe's own check, to reach the engine's
    with pytest.raises(EngineError) as e:
        compress(r, fp16, tmp_path / "out", progress=False)
    assert str(e.value).count("engine='coremltools'") == 1

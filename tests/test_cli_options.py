"""sdwork sweep's generation options and --packages: documented, validated before any file, and
a sweep from a grid name (or a grid without a generation section) plus options."""
import shutil

import pytest
import yaml

from sdwork import cli
from sdwork.cli import main
from sdwork.errors import ConfigError, MismatchError
from sdwork.experiments import grids
from sdwork.generate import DEVICES

PROMPT = "a small red circle on a gray background"
GRID = dict(model="tiny-random", engine="sdwork", components=["text_encoder"], scorer="tiny-random",
            grid=dict(nbits=[4]))


def test_help_documents_the_generation_options_and_where_packages_come_from(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for flag in ("--prompt", "--seed", "--steps", "--size", "--height", "--width", "--guidance", "--threads",
                 "--device", "--packages"):
        assert flag in out, flag
    assert "fp16-packages" in out and "SDWORK_CACHE" in out and "notebook 01" in out
    assert cli.DEVICES == DEVICES


def _gen(*argv):
    return cli._generation(cli._parser().parse_args(["sweep", "--grid", "ci", "--out", "x", *argv]))


def test_options_override_the_grids_generation_section():
    gen = _gen("--prompt", PROMPT, "--prompt", "a blue square", "--seed", "3", "--seed", "4", "--steps", "7",
               "--size", "64", "--guidance", "7.5", "--threads", "2", "--device", "cpu")
    assert gen == dict(prompts=(PROMPT, "a blue square"), seeds=(3, 4), steps=7, guidance=7.5, threads=2,
                       device="cpu", height=64, width=64)
    g = grids.load_grid("ci", generation=gen)
    assert g.settings.prompts == (PROMPT, "a blue square") and g.settings.seeds == (3, 4)
    assert (g.settings.steps, g.settings.height, g.settings.width, g.settings.guidance) == (7, 64, 64, 7.5)
    kept = grids.load_grid("ci", generation=_gen("--steps", "9")).settings  # the rest stays the grid's
    assert kept.steps == 9 and kept.prompts == grids.load_grid("ci").settings.prompts
    assert _gen("--height", "64", "--width", "96") == dict(height=64, width=96) and _gen() == {}


def test_a_grid_without_generation_needs_prompts_and_seeds_as_options():
    g = grids.load_grid(GRID, generation=dict(prompts=(PROMPT,), seeds=(0,)))
    assert g.settings.prompts == (PROMPT,) and g.settings.seeds == (0,)
    with pytest.raises(ConfigError, match=r"no 'generation' section.*--prompt TEXT --seed 0"):
        grids.load_grid(GRID, generation=dict(prompts=(PROMPT,)))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'step'"):
        grids.load_grid("ci", generation=dict(step=3))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--seed", "-1"], "--seed: seeds are 0 or more"),
    (["--seed", "one"], "--seed: 'one' is not a whole number"),
    (["--size", "500"], "--size: 500 is not a multiple of 8"),
    (["--width", "12"], "--width: 12 is not a multiple of 8"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--packages", "no-such-folder"], "--packages: no folder at"),
])
def test_bad_options_exit_2_naming_the_option_before_any_file(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--grid", "ci", "--out", str(tmp_path / "run"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_contradicting_and_duplicate_options_are_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["sweep", "--grid", "ci", "--out", run, "--size", "64", "--height", "64"]) == 2
    assert "--size sets both height and width" in capsys.readouterr().err
    assert main(["sweep", "--grid", "ci", "--out", run, "--prompt", PROMPT, "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "twice" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(pipeline, a folder of fp16 packages a user converted before): a copy of the cached ones."""
    from sdwork.convert.cache import fp16_packages
    from sdwork.experiments.experiment import GENERATION_COMPONENTS
    from sdwork.load import load_pipeline
    from sdwork.weights import round_weights_to_fp16

    pipe = load_pipeline("tiny-random", progress=False)
    round_weights_to_fp16(pipe)
    cached = fp16_packages(pipe, GENERATION_COMPONENTS, progress=False)
    folder = tmp_path_factory.mktemp("converted") / "tiny-random"
    shutil.copytree(next(iter(cached.values())).parent, folder)
    (folder / "source.json").unlink()  # what convert_pipeline writes has no cache stamp
    return pipe, folder


@pytest.mark.slow
def test_a_grid_plus_options_sweeps_on_packages_converted_before(converted, tmp_path, capsys):
    import json

    pipe, folder = converted
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))  # no generation section: the options give it
    run = tmp_path / "run"
    argv = ["sweep", "--grid", str(grid), "--out", str(run), "--no-progress", "--prompt", PROMPT, "--seed", "0",
            "--steps", "2", "--size", "64", "--guidance", "4", "--threads", "1", "--device", "cpu",
            "--packages", str(folder)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"fp16 packages: {folder} (converted before" in out and "km4-pt-te" in out
    gen = json.loads((run / "config.json").read_text())["generation"]
    assert (gen["prompts"], gen["seeds"], gen["steps"], gen["height"], gen["guidance"]) == ([PROMPT], [0], 2, 64, 4.0)
    assert not (folder / "source.json").exists() and not list(folder.glob(".tmp-*"))  # nothing converted there
    row = json.loads((run / "results.jsonl").read_text().splitlines()[0])
    assert row["clip_valid"] is False and "random weights" in row["scorer_note"]  # tiny-random: flagged


def test_packages_made_from_other_inputs_are_refused_naming_each_difference(converted, tmp_path):
    import torch

    from sdwork.convert.cache import user_packages
    from sdwork.load import load_pipeline
    from sdwork.weights import round_weights_to_fp16

    pipe, folder = converted
    assert set(user_packages(pipe, folder, ["text_encoder", "unet"])) == {"text_encoder", "unet"}
    other = load_pipeline("tiny-random", progress=False)
    round_weights_to_fp16(other)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    with pytest.raises(MismatchError, match=r"Unet.mlpackage was made from other inputs.*source_weights"):
        user_packages(other, folder, ["text_encoder", "unet"])
    with pytest.raises(MismatchError, match=r"attention: 'original' there, 'split_einsum_v2' wanted"):
        user_packages(pipe, folder, ["unet"], attention="split_einsum_v2")
    with pytest.raises(MismatchError, match=r"io: 'apple' there, 'diffusers' wanted"):
        user_packages(pipe, folder, ["text_encoder"], io="diffusers")
    with pytest.raises(ConfigError, match=r"has no VAEEncoder.mlpackage \(vae_encoder\)"):
        user_packages(pipe, folder, ["vae_encoder"])

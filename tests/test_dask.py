"""Sweeps and sensitivity cells on a real Dask LocalCluster (two worker processes): rows equal to a
serial run's, a worker killed mid-task loses and duplicates nothing, bad input refused early."""
import json
import os
import socket

import numpy as np
import pytest

from conftest import tiny_specs
from sdwork import hooks
from sdwork.compress.recipe import Recipe
from sdwork.errors import ConfigError
from sdwork.experiments import sensitivity as S
from sdwork.experiments.executors import TASKS, Dask, executor_for
from sdwork.experiments.experiment import Experiment
from sdwork.generate import GenSettings
from sdwork.io import read_rows

MODEL, CLIP = tiny_specs()
SETTINGS = GenSettings(prompts=("a small red circle on a gray background",), seeds=(0,), steps=2, threads=1)
TE = ("text_encoder",)
RECIPES = [Recipe(nbits=2, components=TE, engine="sdwork"), Recipe(nbits=4, components=TE, engine="sdwork")]
TIMINGS = {"compress_s", "compress_cpu_s", "evaluate_s", "evaluate_cpu_s", "seconds"}


def measured(row: dict) -> dict:
    """A row without its timings: what must be the same wherever the task ran."""
    return {k: v for k, v in row.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return Experiment(MODEL, SETTINGS, CLIP, tmp_path_factory.mktemp("dask") / "serial", progress=False)


@pytest.fixture(scope="module")
def serial(exp):
    """The serial sweep's rows, by name."""
    exp.sweep(RECIPES)
    return {r["name"]: r for r in read_rows(exp.out / "results.jsonl")}


def other(exp, out) -> Experiment:
    """Another run folder on the already loaded fp16 pipeline (the workers load their own)."""
    return Experiment(MODEL, SETTINGS, CLIP, out, pipe=exp.pipe, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """A cluster started outside sdwork, joined by its address (as --scheduler does)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def _install_killer(marker, dask_worker=None):
    """On a worker: the first variant that reaches "variant_compressed" on any worker kills its process
    (os._exit, no cleanup); the marker file makes it the only one."""
    import contextlib

    from sdwork import hooks

    def kill(name):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{name} {os.getpid()}".encode())
        os.close(fd)
        os._exit(1)

    stack = contextlib.ExitStack()
    stack.enter_context(hooks.on("variant_compressed", kill))
    dask_worker.sdwork_test_hooks = stack  # kept alive as long as this worker process


def _grid_file(folder) -> str:
    """RECIPES and SETTINGS as a grid file, for the command line."""
    import yaml

    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=MODEL, engine="sdwork", components=list(TE), scorer=CLIP,
        generation=dict(prompts=list(SETTINGS.prompts), seeds=list(SETTINGS.seeds), steps=SETTINGS.steps, threads=1),
        grid=dict(nbits=[r.nbits for r in RECIPES], group_size=[None]))))
    return str(path)


def _assert_clean(out, names):
    assert not (out / TASKS).exists()  # no attempt folder left, the killed one's included
    assert sorted(p.name for p in (out / "variants").iterdir()) == sorted(names)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(["baseline.npz"] + [f"{n}.npz" for n in names])


@pytest.mark.slow
def test_dask_rows_are_the_serial_rows(exp, serial, tmp_path):
    e = other(exp, tmp_path)
    df = e.sweep(RECIPES, executor=Dask(workers=2))  # a local cluster sdwork starts and stops
    assert list(df["name"]) == [r.name for r in RECIPES] and list(df["status"]) == ["ok", "ok"]
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert measured(row) == measured(serial[row["name"]])  # same key, bit-identical metrics and sizes
        a = np.load(exp.out / row["images"])["images"]
        assert np.array_equal(np.load(tmp_path / row["images"])["images"], a)
        pkg = "TextEncoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
        assert (tmp_path / row["packages"] / pkg).read_bytes() == (exp.out / row["packages"] / pkg).read_bytes()
    _assert_clean(tmp_path, [r.name for r in RECIPES])


@pytest.mark.slow
def test_a_worker_killed_mid_task_loses_nothing_and_duplicates_nothing(exp, serial, cluster, tmp_path, capsys):
    from distributed import Client

    from sdwork.cli import main

    marker = tmp_path / "killed"
    with Client(cluster) as client:
        client.run(_install_killer, str(marker))
    e, ex = other(exp, tmp_path / "run"), Dask(scheduler=cluster.scheduler_address)
    e.sweep(RECIPES[:1], executor=ex)
    assert marker.read_text().startswith(RECIPES[0].name)  # a worker died mid-task, the task ran again
    first = (e.out / "results.jsonl").read_text()
    assert [measured(json.loads(l)) for l in first.splitlines()] == [measured(serial[RECIPES[0].name])]
    _assert_clean(e.out, [RECIPES[0].name])

    done = []  # resume from the command line: only the missing recipe runs, the finished row stays as it was
    with hooks.on("variant_done", lambda name: done.append(name)):
        assert main(["sweep", "--grid", _grid_file(tmp_path), "--out", str(e.out), "--no-progress",
                     "--executor", "dask", "--scheduler", cluster.scheduler_address]) == 0
    assert done == [RECIPES[1].name] and "2 variants of this grid" in capsys.readouterr().out
    text = (e.out / "results.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 2
    assert [measured(r) for r in read_rows(e.out / "results.jsonl")] == [measured(serial[r.name]) for r in RECIPES]
    _assert_clean(e.out, [r.name for r in RECIPES])


@pytest.mark.slow
def test_sensitivity_cells_on_the_cluster_are_the_serial_cells(cluster, tmp_path):
    config = S.SensitivityConfig(model=MODEL, probe=S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], steps=2),
                                 nbits=(2,), group_sizes=(None,), max_layers=2)
    here = S.Sensitivity(config, tmp_path / "here", progress=False).run()
    there = S.Sensitivity(config, tmp_path / "there", progress=False)
    table = there.run(executor=Dask(scheduler=cluster.scheduler_address))
    assert len(table) == 2 and there.last_run["measured"] == 2
    assert table.drop(columns="seconds").equals(here.drop(columns="seconds"))
    assert there.run(executor=Dask(scheduler=cluster.scheduler_address)).drop(columns="seconds").equals(
        here.drop(columns="seconds")) and there.last_run["measured"] == 0  # nothing left: no task


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_executor_options_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="workers must be >= 1, got 0"):
        Dask(workers=0)
    with pytest.raises(ConfigError, match="not both"):
        Dask(scheduler="tcp://head:8786", workers=2)
    with pytest.raises(ConfigError, match="add --executor dask"):
        executor_for("serial", workers=2)
    with pytest.raises(ConfigError, match="executor"):
        executor_for("spark")
    assert executor_for(None) is None and executor_for("dask", workers=3) == Dask(workers=3)


def test_the_cli_refuses_bad_executor_options_before_any_file(tmp_path, capsys):
    from sdwork.cli import main

    out = tmp_path / "run"
    for argv, message in [(["--executor", "dask", "--workers", "0"], "workers must be >= 1"),
                          (["--executor", "dask", "--workers", "2", "--scheduler", "tcp://head:8786"], "not both"),
                          (["--workers", "2"], "add --executor dask")]:
        assert main(["sweep", "--grid", "ci", "--out", str(out), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_scheduler_is_refused_before_any_file(exp, tmp_path):
    e = other(exp, tmp_path / "run")
    with pytest.raises(ConfigError, match="no Dask scheduler answers at 'tcp://127.0.0.1:.*start one"):
        e.sweep(RECIPES, executor=Dask(scheduler=f"tcp://127.0.0.1:{_closed_port()}", timeout=1))
    assert not e.out.exists()

"""Where variant tasks run: here, one after another (the default), or as tasks on a Dask cluster.

    exp.sweep("default", executor=Dask(workers=2))                     # a local cluster, 2 processes
    exp.sweep("default", executor=Dask(scheduler="tcp://head:8786"))   # a cluster already running
    sdwork sweep --grid default --out runs/x --executor dask --workers 2

On a cluster each variant (or sensitivity cell) is one dask.distributed task: a function of small
picklable inputs (model spec, settings, scorer spec, recipe, paths). The driver computes the fp16
baseline and packages first; workers read them from shared storage (the run folder and
$SDWORK_CACHE), load their own pipeline once, and write a variant's packages and images into a
private folder for that attempt under `<run>/.tasks/`. The driver alone moves an attempt's files
into place and appends rows, and only for keys not done yet: a worker killed mid-task loses
nothing (the scheduler runs the task again on another worker) and duplicates nothing, and a
rerun resumes as it does here. The scheduling is dask's; docs/dask.md has Slurm and Kubernetes
recipes.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdwork import quiet, validate
from sdwork.errors import ConfigError, EngineError, MismatchError, SdworkError
from sdwork.io import append_row

EXECUTORS = ("serial", "dask")
TASKS = ".tasks"  # <run>/.tasks/<task>/<attempt>/: what one attempt writes before the driver adopts it
DEFAULT_WORKERS = 2  # each local worker holds a whole pipeline: few by default


@dataclass(frozen=True)
class Dask:
    """A Dask cluster to run tasks on: `scheduler` (an address, e.g. tcp://head:8786) of one already
    running, else a LocalCluster of `workers` processes with one thread each, started for the sweep.
    `retries`: how often a task that raised an unexpected error runs again (a killed worker's task is
    rescheduled by dask itself, up to distributed.scheduler.allowed-failures times)."""

    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2
    timeout: float = 10.0  # seconds to wait for the scheduler to answer

    def __post_init__(self):
        if self.scheduler is not None and self.workers is not None:
            raise ConfigError(f"give a scheduler address ({self.scheduler!r}) or a number of local workers "
                              f"({self.workers}), not both: --workers starts a local cluster, --scheduler joins one")
        if self.scheduler is not None:
            validate.text("scheduler", self.scheduler, empty=False)
        if self.workers is not None:
            validate.integer("workers", self.workers, lo=1, fix="the number of local worker processes, e.g. 2")
        validate.integer("retries", self.retries, lo=0)
        validate.real("timeout", self.timeout, lo=0.1)

    def check(self) -> None:
        """Refuse a scheduler that does not answer (a local cluster is started when used)."""
        if self.scheduler is not None:
            self._connect().close()

    def _connect(self):
        from distributed import Client

        try:
            return Client(self.scheduler, timeout=self.timeout)
        except (OSError, ValueError, TypeError) as e:
            reason = str(e)
        gc.collect()  # the half-made Client closes now (outside the except: nothing holds it), not noisily at exit
        raise ConfigError(f"no Dask scheduler answers at {self.scheduler!r} within {self.timeout:g} s ({reason}); "
                          "start one (`dask scheduler`, see docs/dask.md) or fix --scheduler, e.g. tcp://head:8786")

    @contextlib.contextmanager
    def client(self):
        """A connected distributed.Client (and the LocalCluster it started, closed after)."""
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            # processes, not threads: torch's thread pool and the pipeline are per process. No memory
            # limit: the pipeline is no dask data that could spill, and dask's kill at 95% of an even
            # share would fail variants the machine can hold
            with LocalCluster(n_workers=self.workers or DEFAULT_WORKERS, threads_per_worker=1, processes=True,
                              memory_limit=0, dashboard_address=None) as cluster, Client(cluster) as client:
                yield client
            return
        with self._connect() as client:
            yield client


def executor_for(executor=None, scheduler: str | None = None, workers: int | None = None) -> Dask | None:
    """The executor a sweep names: None for here and now (None or "serial"), else a Dask."""
    if isinstance(executor, Dask):
        if scheduler is not None or workers is not None:
            raise ConfigError("pass scheduler/workers inside Dask(...), not beside it")
        return executor
    if executor is not None and not isinstance(executor, str):
        raise ConfigError(f"executor must be 'serial', 'dask' or a sdwork.experiments.executors.Dask, "
                          f"got {type(executor).__name__}")
    validate.choice("executor", executor or "serial", EXECUTORS)
    if executor == "dask":
        return Dask(scheduler=scheduler, workers=workers)
    if scheduler is not None or workers is not None:
        raise ConfigError("--scheduler and --workers choose a Dask cluster: add --executor dask")
    return None


# --- the driver's loop: submit every task, adopt each result as it arrives --------------


def _run_tasks(client, fn, jobs: list, adopt, fail, retries: int, desc: str, progress: bool) -> None:
    """Run fn(job) for every job on the cluster; adopt(job, result) or fail(job, message) as each ends.
    An unexpected error cancels what is left and is raised: the finished rows are kept."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    futures = {client.submit(fn, job, key=f"sdwork-{job.label}-{uuid.uuid4().hex[:8]}", retries=retries,
                             pure=False): job for job in jobs}
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="task", disable=not progress):
            job = futures[fut]
            try:
                result = fut.result()
            except KilledWorker as e:  # the task killed every worker it ran on (out of memory?)
                fail(job, f"the task killed the workers it ran on ({e}); give workers more memory or run it here")
                continue
            if "error" in result:
                fail(job, result["error"])
            else:
                adopt(job, result)
    finally:
        client.cancel(list(futures))


# --- per-worker state --------------------------------------------------------------------

_state: dict = {}  # this worker process's experiment, keyed by its setup (one at a time)
_lock = threading.Lock()  # the pipeline is one object: tasks on a worker's threads take turns


def _task_folder(root: Path) -> Path:
    """A private folder for this attempt inside the driver's task folder, which must be visible here."""
    if not root.is_dir():
        raise ConfigError(f"{root} does not exist on worker {os.uname().nodename}: the run folder must be on a "
                          "filesystem every worker and the driver share (docs/dask.md)")
    attempt = root / f"attempt-{uuid.uuid4().hex[:8]}"
    attempt.mkdir()
    return attempt


# --- variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantJob:
    """Everything a worker needs to measure one variant: small, picklable, paths on shared storage."""

    recipe: object  # sdwork.Recipe
    key: str
    model: str
    settings: object  # GenSettings
    scorer: str | None
    attention: str
    evaluator: str
    keep_packages: bool
    setup: dict  # the driver's Experiment.setup: the worker's must be the same
    packages: dict  # {component: fp16 package}
    baseline: str  # <run>/images/baseline.npz
    folder: str  # <run>/.tasks/<task>

    @property
    def label(self) -> str:
        return self.recipe.name


def measure_variant(job: VariantJob) -> dict:
    """On a worker: compress and score one variant into a private folder; the row, or the sdwork
    error that stopped it (an input error would fail every retry the same way)."""
    with _lock, quiet.capture():  # library notices held back, as in a notebook
        try:
            exp = _worker_experiment(job)
            exp.out = _task_folder(Path(job.folder))
            return dict(row=exp._measure(job.recipe, job.key), folder=str(exp.out))
        except SdworkError as e:
            return dict(error=str(e))


def _worker_experiment(job: VariantJob):
    """This worker's Experiment for the job's setup: pipeline and scorer loaded once, the driver's
    baseline and fp16 packages read from shared storage."""
    from sdwork.experiments.experiment import Experiment

    tag = ("variant", job.model, job.settings, job.scorer, job.attention, job.evaluator)
    if _state.get("tag") != tag:
        _state.clear()  # one pipeline per worker: free the last setup's before loading this one
        exp = Experiment(job.model, job.settings, job.scorer, job.folder, progress=False,
                         keep_packages=job.keep_packages, attention=job.attention, evaluator=job.evaluator)
        _check_same_setup(exp.setup, job.setup)
        for c, p in job.packages.items():
            if not Path(p).exists():
                raise ConfigError(f"fp16 package {p} does not exist on worker {os.uname().nodename}: put "
                                  "$SDWORK_CACHE on a filesystem every worker shares (docs/dask.md)")
        exp._packages = {c: Path(p) for c, p in job.packages.items()}
        exp._baseline = np.load(job.baseline)["images"]
        _check_same_images(exp)
        _state.update(tag=tag, exp=exp)
    exp = _state["exp"]
    exp.keep_packages = job.keep_packages
    return exp


def _check_same_setup(have: dict, want: dict) -> None:
    from sdwork.io import differences

    diff = differences(have, want)
    if diff:
        raise MismatchError(f"worker {os.uname().nodename} loaded other inputs than the driver ({'; '.join(diff)}); "
                            "give every worker the same model, scorer and sdwork (a shared folder, same versions)")


def _check_same_images(exp) -> None:
    """The worker's fp16 pipeline must draw the driver's first baseline image bit for bit: another CPU
    or library build changes the last bits, and its scores would not be comparable."""
    from sdwork.generate import generate, resolve_device

    if resolve_device(exp.settings.device) != "cpu":
        return  # fp16 kernels off the CPU are not bit-reproducible across machines anyway
    prompt, seed = exp.settings.pairs[0]
    first = generate(exp.pipe, replace(exp.settings, prompts=(prompt,), seeds=(seed,)), progress=False)
    if not np.array_equal(first[0], exp.baseline[0]):
        raise MismatchError(f"worker {os.uname().nodename} generates other bits than the driver for the fp16 "
                            "baseline (another CPU or library build); run workers on the driver's hardware and "
                            "environment, or run the sweep there")


def run_variants(exp, recipes: list, executor: Dask) -> None:
    """Measure `recipes` (none of them done yet) as tasks on a cluster; the driver appends the rows."""
    todo = [r for r in recipes if not _same_recipe_done(exp, r)]
    for r in recipes:
        if r not in todo:
            exp.run(r)  # measured before under a label: copied here, nothing to compute
    if not todo:
        return
    packages = {c: str(p) for c, p in exp.fp16_packages(_components(todo)).items()}
    root = exp.out / TASKS
    shutil.rmtree(root, ignore_errors=True)  # left by an interrupted driver: no row points into it
    jobs = [_variant_job(exp, r, packages, root) for r in todo]
    try:
        with executor.client() as client:
            _run_tasks(client, measure_variant, jobs, lambda j, res: _adopt_variant(exp, j, res),
                       lambda j, msg: exp._record_failure(j.recipe, EngineError(msg)), executor.retries,
                       "variants", exp.progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _same_recipe_done(exp, recipe) -> bool:
    key = exp.key(recipe)
    return any(r.get("recipe_key") == key for r in exp.done().values())


def _components(recipes) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for r in recipes for c in r.components))


def _variant_job(exp, recipe, packages: dict, root: Path) -> VariantJob:
    key = exp.key(recipe)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    return VariantJob(recipe=recipe, key=key, model=exp.model, settings=exp.settings, scorer=exp.scorer_spec,
                      attention=exp.attention, evaluator=exp.evaluator, keep_packages=exp.keep_packages,
                      setup=exp.setup, packages=packages, baseline=str(exp.out / "images" / "baseline.npz"),
                      folder=str(folder))


def _adopt_variant(exp, job: VariantJob, result: dict) -> None:
    """Move one finished attempt's files into the run folder and append its row (once per key)."""
    if job.key in exp.done():
        return  # a duplicate attempt (the task ran twice): the first row stands
    attempt, row = Path(result["folder"]), result["row"]
    for rel in (row["packages"], row["images"]):
        src, dst = attempt / rel, exp.out / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir():
                shutil.rmtree(dst)  # a stale folder of this name with no row of this key (as here)
            os.replace(src, dst)
    exp._run(job.recipe, None, None, lambda recipe, key: row)  # the row as run() appends it
    shutil.rmtree(attempt.parent, ignore_errors=True)  # this attempt and any a killed worker left


# --- sensitivity cells -------------------------------------------------------------------


@dataclass(frozen=True)
class CellJob:
    """One (layer, candidate) cell of a sensitivity table."""

    config: object  # SensitivityConfig
    folder: str  # the sensitivity run folder (sensitivity.json there names the setup)
    layer: str
    candidate: str
    describe: dict  # the driver's Sensitivity.describe()
    reference: object  # the driver's reference ProbeOutput: the worker's must be the same

    @property
    def label(self) -> str:
        return f"{self.layer}-{self.candidate}"


def measure_cell(job: CellJob) -> dict:
    """On a worker: one sensitivity cell's row (or the sdwork error that stopped it)."""
    from sdwork.experiments.sensitivity import parse_candidate

    with _lock, quiet.capture():
        try:
            sens = _worker_sensitivity(job)
            return dict(row=sens.measure_cell(sens.layer(job.layer), parse_candidate(job.candidate)))
        except SdworkError as e:
            return dict(error=str(e))


def _worker_sensitivity(job: CellJob):
    from sdwork.experiments.sensitivity import Sensitivity

    tag = ("cell", job.folder, repr(job.config))
    if _state.get("tag") != tag:
        _state.clear()
        sens = Sensitivity(job.config, job.folder, progress=False)  # reads the driver's sensitivity.json
        _check_same_setup(sens.describe(), job.describe)
        ref = job.reference
        if not (np.array_equal(sens.reference.latents, ref.latents) and np.array_equal(sens.reference.images, ref.images)):
            raise MismatchError(f"worker {os.uname().nodename} computes another reference probe than the driver "
                                "(another CPU or library build); run workers on the driver's hardware and environment")
        _state.update(tag=tag, sens=sens)
    return _state["sens"]


def run_cells(sens, cells: list, executor: Dask, path: Path) -> None:
    """Measure sensitivity cells [(layer, spec)] as tasks; the driver appends each row to `path` once."""
    from sdwork.experiments.sensitivity import candidate_name
    from sdwork.io import read_rows

    if not cells:
        return
    jobs = [CellJob(sens.config, str(sens.dir), l.module, candidate_name(s), sens.describe(), sens.reference)
            for l, s in cells]

    def adopt(job, result):
        if (job.layer, job.candidate) not in {(r["layer"], r["candidate"]) for r in read_rows(path)}:
            append_row(path, result["row"])

    def fail(job, message):
        raise EngineError(f"sensitivity cell {job.label} failed on the cluster: {message}")

    with executor.client() as client:
        _run_tasks(client, measure_cell, jobs, adopt, fail, executor.retries,
                   f"sensitivity {sens.config.component}", sens.progress)

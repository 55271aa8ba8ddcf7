"""The full-size journey on a random-init SD 1.5 folder: build it, convert (notebook 01: the four
components, then parity), sweep 2 recipes x 1 prompt x 1 seed at 512x512, 4 steps; time and peak
memory of every stage, and of the same stages through the old path, as a ratio, in one run.

    flock /tmp/sdwork-cpu.lock .venv/bin/python benchmarks/fullsize_sweep.py [--work DIR] [--no-reference]
    .venv/bin/python benchmarks/fullsize_sweep.py --device cuda     # on a GPU; adds the default grid's images/s
    .venv/bin/python benchmarks/fullsize_sweep.py --model tiny --size 0 --steps 2   # a smoke run in minutes

Every stage runs in a subprocess of its own, which reports its wall time and its peak RSS
(ru_maxrss, the high-water mark of that process alone; on CUDA also the peak GPU memory).
The old path ("ref" stages, skipped with --no-reference) is what sdwork did before evaluating in
place: a variant's weights decompressed all at once into a deep copy of the pipeline, and
parity holding the fp16 source copy and the test copy of each module together. Conversion has no
old stage: it changed only by freeing each component's coremltools program before the next
(the issue measured 780 s and 14.6 GiB for notebook 01 as a whole: convert + parity).
Goals: convert <= 9 GiB, the 2-recipe sweep <= 8 GiB. Heavy at full size: about 30 minutes of both
cores and 12 GB of disk under --work (kept, so a rerun skips the build).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GIB = 2**30
GOALS_GIB = {"convert": 9.0, "sweep": 8.0}
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
RECIPES = (dict(nbits=4), dict(nbits=6))  # the UNet palettized by sdwork's exact engine
PROMPT = "a photograph of an astronaut riding a horse"


# ------------------------------------------------------------------ the stages (in a subprocess)
def stage_build(a) -> dict:
    from sdwork.convert.fullsize import save_random_folder

    folder = Path(a.work) / f"{a.arch}-random"
    if not (folder / "model_index.json").exists():
        save_random_folder(a.arch, folder)
    return dict(folder=str(folder))


def _pipe(a):
    from sdwork.load import load_pipeline

    return load_pipeline(a.model or str(Path(a.work) / f"{a.arch}-random"), progress=False)


def stage_convert(a) -> dict:
    from sdwork.convert import convert_pipeline

    paths = convert_pipeline(_pipe(a), _packages(a), components=COMPONENTS, progress=a.progress)
    return dict(packages={c: str(p) for c, p in paths.items()})


def stage_parity(a, old: bool = False) -> dict:
    from sdwork.convert import components as C
    from sdwork.evaluate import parity

    pipe = _pipe(a)
    packages = {c: _packages(a) / C.spec(c).package for c in COMPONENTS}
    with _old_parity() if old else contextlib.nullcontext():
        table = parity.parity_report(pipe, packages, progress=a.progress)
    return dict(linux_pass=bool(table["linux_pass"].all()), psnr_min=float(table[["psnr_random", "psnr_real"]].min().min()))


def stage_sweep(a, old: bool = False) -> dict:
    import sdwork.evaluate.variant as V
    from sdwork.compress.recipe import Recipe
    from sdwork.experiments.experiment import Experiment
    from sdwork.generate import GenSettings

    settings = GenSettings(prompts=(PROMPT,), seeds=(0,), steps=a.steps, height=a.size or None, width=a.size or None,
                           device=a.device, batch_size=a.batch_size)
    out = Path(a.work) / ("sweep-ref" if old else "sweep")
    exp = Experiment(_pipe_spec(a), settings, None, out, pipe=_pipe(a), progress=a.progress,
                     packages=_packages(a), keep_packages=False)
    recipes = [Recipe(**r, components=("unet",), engine="sdwork") for r in RECIPES]
    t0 = time.perf_counter()
    exp.baseline
    base_s = time.perf_counter() - t0
    with _old_evaluation(V) if old else contextlib.nullcontext():
        df = exp.sweep(recipes)
    gen_s = base_s + float(df["evaluate_s"].sum())
    images = len(settings.pairs) * (1 + len(recipes))
    return dict(psnr={r["name"]: r["psnr"] for _, r in df.iterrows()}, threads=exp.settings.threads,
                baseline_s=round(base_s, 1), compress_s=round(float(df["compress_s"].sum()), 1),
                evaluate_s=round(float(df["evaluate_s"].sum()), 1), images_per_s=round(images / gen_s, 4))


def stage_default_grid(a) -> dict:
    """The default grid (the embedded model) on the device: what a user's first sweep costs there."""
    from sdwork.experiments.experiment import Experiment

    exp, recipes = Experiment.from_grid("default", Path(a.work) / "default-grid", generation=dict(device=a.device),
                                        progress=a.progress)
    t0 = time.perf_counter()
    df = exp.sweep(recipes)
    seconds = time.perf_counter() - t0
    images = len(exp.settings.pairs) * (1 + len(df))
    return dict(variants=len(df), images=images, seconds=round(seconds, 1), images_per_s=round(images / seconds, 3))


STAGES = {
    "build": stage_build, "convert": stage_convert, "parity": stage_parity,
    "parity-ref": lambda a: stage_parity(a, old=True), "sweep": stage_sweep,
    "sweep-ref": lambda a: stage_sweep(a, old=True), "default-grid": stage_default_grid,
}


def _packages(a) -> Path:
    return Path(a.work) / "convert"


def _pipe_spec(a) -> str:
    return a.model or str(Path(a.work) / f"{a.arch}-random")


# ------------------------------------------------------------------ the old path, for the reference
@contextlib.contextmanager
def _old_evaluation(V):
    """Evaluation as it was: a deep copy of the pipeline, every package weight expanded at once."""
    from sdwork.convert import components as C
    from sdwork.coreml.package import package_weights

    @contextlib.contextmanager
    def deep_copy(pipe, packages, fp16_packages=None):
        variant = copy.deepcopy(pipe)
        for comp, package in packages.items():
            _old_load(C.torch_module(variant, comp), comp, package, package_weights)
        yield variant

    before, V.variant_weights = V.variant_weights, deep_copy
    try:
        yield
    finally:
        V.variant_weights = before


def _old_load(module, comp, package, package_weights):
    import torch

    from sdwork.convert.into_torch import _as_tensor, check_belongs

    wm = check_belongs(module, comp, package)
    weights = package_weights(package)  # the whole program's dense weights at once
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, e in wm.entries.items():
            if e.kind == "identity":
                params[name].fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                params[name].copy_(_as_tensor(weights[e.const], params[name], name, package))


@contextlib.contextmanager
def _old_parity():
    """Parity as it was: the fp16 source copy and the NaN test copy of each module held together."""
    from sdwork.evaluate import parity

    held, fp16_copy, one_component = [], parity._fp16_copy, parity.component_parity

    def source_copy(module):
        held.append(fp16_copy(module))  # alive to the end of its component, as the old local was
        return held[-1]

    def component(*args, **kw):
        try:
            return one_component(*args, **kw)
        finally:
            held.clear()

    def nan_copy(module, sp):
        m = copy.deepcopy(module).eval()
        for n, p in m.named_parameters():
            if sp.owns(n):
                p.data.fill_(float("nan"))
        return m

    before = parity._fp16_copy, parity._nan_copy, parity.component_parity
    parity._fp16_copy, parity._nan_copy, parity.component_parity = source_copy, nan_copy, component
    try:
        yield
    finally:
        parity._fp16_copy, parity._nan_copy, parity.component_parity = before


# ------------------------------------------------------------------ driver
def run_stage(a) -> None:
    """In the child: run one stage, print its figures as one JSON line."""
    import torch

    t0 = time.perf_counter()
    facts = STAGES[a.stage](a)
    facts.update(seconds=round(time.perf_counter() - t0, 1),
                 peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2))
    if torch.cuda.is_available() and a.device != "cpu":
        facts["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    print("STAGE " + json.dumps(facts), flush=True)


def spawn(stage: str, argv: list[str], env: dict) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, *argv]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("STAGE ")]
    if proc.returncode or not lines:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode}); rerun it alone: {' '.join(cmd)}")
    return json.loads(lines[-1][len("STAGE "):])


def main(a, argv: list[str]) -> None:
    Path(a.work).mkdir(parents=True, exist_ok=True)
    stages = (["build"] if not a.model else []) + ["convert", "parity"]
    stages += ["parity-ref"] if a.reference else []
    stages += ["sweep"] + (["sweep-ref"] if a.reference else [])
    stages += ["default-grid"] if a.device != "cpu" else []
    results = {}
    for stage in stages:
        # each stage its own cache, so no stage reuses a baseline another generated
        env = dict(os.environ, SDWORK_CACHE=str(Path(a.work) / "cache" / stage), HF_HUB_OFFLINE="1")
        results[stage] = spawn(stage, argv, env)
        print(f"{stage:12s} {results[stage]['seconds']:8.1f} s  peak RSS {results[stage]['peak_rss_gib']:6.2f} GiB  "
              + json.dumps({k: v for k, v in results[stage].items() if k not in ("seconds", "peak_rss_gib", "packages")}),
              flush=True)
    report(results)
    out = Path(a.work) / "fullsize_sweep.json"
    out.write_text(json.dumps(dict(args=vars(a), stages=results), indent=1))
    print(f"wrote {out}")


def report(results: dict) -> None:
    for stage in ("parity", "sweep"):
        new, old = results.get(stage), results.get(f"{stage}-ref")
        if new and old:
            print(f"{stage}: peak RSS {new['peak_rss_gib']:.2f} / {old['peak_rss_gib']:.2f} GiB = "
                  f"{new['peak_rss_gib'] / old['peak_rss_gib']:.2f}x the old path; time "
                  f"{new['seconds'] / old['seconds']:.2f}x")
    for stage, goal in GOALS_GIB.items():
        if stage in results:
            got = results[stage]["peak_rss_gib"]
            print(f"goal {stage} <= {goal} GiB: {got:.2f} GiB, {'met' if got <= goal else 'NOT met'}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "benchmarks" / "fullsize"), help="folder for everything")
    p.add_argument("--arch", default="sd15", help="data/configs architecture of the random-init folder")
    p.add_argument("--model", help="another pipeline instead (e.g. 'tiny' for a smoke run): no build stage")
    p.add_argument("--size", type=int, default=512, help="image side in pixels; 0: the model's native size")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"))
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the old path's stages")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.stage:
        run_stage(args)
    else:
        main(args, [x for x in sys.argv[1:]])

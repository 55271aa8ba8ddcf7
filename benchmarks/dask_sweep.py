"""The default embedded sweep run serially and on a local Dask cluster, in the same process.

Both runs sweep the same recipes of a grid (default: "default", 20 recipes x 12 images x 20 steps
on the embedded model) into fresh run folders. The fp16 baseline and packages are made first and
not timed (both runs share them); the Dask time includes starting the cluster and each worker
loading its pipeline, which a real sweep pays too. Prints both times, the ratio and whether the
rows agree (every column but the timings), plus the machine's load: on a shared machine the
ratio says as much about the neighbours as about Dask.

    .venv/bin/python benchmarks/dask_sweep.py                  # the whole default grid, 2 workers
    .venv/bin/python benchmarks/dask_sweep.py --limit 4 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TIMINGS = {"compress_s", "compress_cpu_s", "evaluate_s", "evaluate_cpu_s"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="default")
    p.add_argument("--limit", type=int, help="sweep only the grid's first N recipes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="folder for the two run folders (default: a temporary one)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sdwork.experiments.executors import Dask
    from sdwork.experiments.experiment import Experiment
    from sdwork.io import read_rows

    root = Path(args.out or tempfile.mkdtemp(prefix="sdwork-dask-bench-"))
    serial, recipes = Experiment.from_grid(args.grid, root / "serial", limit=args.limit, progress=False)
    dask = Experiment(serial.model, serial.settings, serial.scorer_spec, root / "dask", pipe=serial.pipe,
                      progress=False)
    # untimed: made once here, read by both runs (the workers read them from the cache and run folder)
    serial.baseline
    serial.fp16_packages(tuple(dict.fromkeys(c for r in recipes for c in r.components)))
    print(f"{len(recipes)} recipes x {len(serial.settings.pairs)} images x {serial.settings.steps} steps "
          f"({args.grid}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before")

    t0 = time.perf_counter()
    serial.sweep(recipes)
    t_serial = time.perf_counter() - t0
    print(f"serial:            {t_serial:8.1f} s")
    t0 = time.perf_counter()
    dask.sweep(recipes, executor=Dask(workers=args.workers))
    t_dask = time.perf_counter() - t0
    print(f"dask, {args.workers} workers:   {t_dask:8.1f} s   (cluster start and worker loads included)")
    print(f"ratio dask / serial: {t_dask / t_serial:.2f}  (speed-up {t_serial / t_dask:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f} after")

    def measured(out):
        return {r["key"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in read_rows(out / "results.jsonl")}

    same = measured(serial.out) == measured(dask.out)
    print(f"rows identical but for timings: {'yes' if same else 'NO'} ({len(measured(dask.out))} rows in {root})")


if __name__ == "__main__":
    main()

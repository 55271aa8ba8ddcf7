"""Command line: headless sweeps and size reports.

    sdwork sweep --model tiny --grid data/grids/default.yaml --out runs/sweep
    sdwork results runs/sweep
    sdwork sizes runs/sweep/variants/km4-g16/Unet.mlpackage
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"sdwork: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdwork", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True, metavar="command")

    s = sub.add_parser("sweep", help="run a palettization sweep (reruns skip finished variants)")
    s.add_argument("--grid", required=True, help="grid YAML, or a name in data/grids/ (default, ci)")
    s.add_argument("--out", required=True, help="run folder, e.g. runs/sweep; results.jsonl lands there")
    s.add_argument("--model", help="model spec: tiny, tiny-random, a diffusers folder or hub id (default: the grid's)")
    s.add_argument("--engine", choices=["coremltools", "sdwork", "torch"], help="override the grid's engine")
    s.add_argument("--scorer", help="CLIP scorer: tiny, tiny-random, a folder or hub id (default: the grid's)")
    s.add_argument("--limit", type=int, help="run at most this many of the grid's recipes (in grid order)")
    s.add_argument("--drop-packages", action="store_true", help="delete each variant's packages after scoring")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_sweep)

    r = sub.add_parser("results", help="print a run's results table")
    r.add_argument("run", help="run folder or results.jsonl")
    r.add_argument("--sort", default="size_bytes")
    r.set_defaults(func=_results)

    z = sub.add_parser("sizes", help="exact on-disk size accounting of .mlpackage files")
    z.add_argument("packages", nargs="+")
    z.add_argument("--layers", action="store_true", help="also print one line per weight")
    z.set_defaults(func=_sizes)
    return p


def _sweep(args) -> int:
    import time

    from sdwork.sweep import load_config, run_sweep, summary_table

    cfg = load_config(args.grid, model=args.model, engine=args.engine, scorer=args.scorer, limit=args.limit)
    t0 = time.perf_counter()
    df = run_sweep(cfg, args.out, progress=not args.no_progress, keep_packages=not args.drop_packages)
    print(_table(summary_table(df)))
    print(f"{len(df)} variants of this grid in {args.out}/results.jsonl ({time.perf_counter() - t0:.0f} s)")
    return 0


def _results(args) -> int:
    from sdwork.sweep import load_results, summary_table

    df = load_results(args.run)
    if df.empty:
        print(f"no results in {args.run}")
        return 1
    print(_table(summary_table(df, sort=args.sort)))
    return 0


def _table(df) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _sizes(args) -> int:
    from sdwork.sizes import package_sizes

    for p in args.packages:
        s = package_sizes(p)
        print(p, " ".join(f"{k}={v}" for k, v in s.summary().items()))
        if args.layers:
            print(s.table().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

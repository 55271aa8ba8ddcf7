"""Command line: headless sweeps and size reports.

    sdwork sweep --grid default --out runs/sweep
    sdwork results runs/sweep
    sdwork sizes runs/sweep/variants/km4-g16-sdwork/Unet.mlpackage
    sdwork bundle runs/sweep --out runs/ship --variant km4-g16-sdwork --chunks 2

Bad input is reported in one line naming the fix (exit status 2); --debug shows the traceback.
Any other error is a bug in sdwork and says so (exit status 1).
"""
from __future__ import annotations

import argparse
import sys
import traceback


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sdwork.errors import SdworkError

    try:
        return args.func(args)
    except SdworkError as e:
        if args.debug:
            traceback.print_exc()
        print(f"sdwork: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdwork: interrupted; finished rows are kept, a rerun resumes", file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        print(f"sdwork: internal error (a bug in sdwork, please report it with the traceback above): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}; leave --limit out to run every recipe")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdwork", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = p.add_subparsers(required=True, metavar="command")

    s = sub.add_parser("sweep", help="run a palettization sweep (reruns skip finished variants)")
    s.add_argument("--grid", required=True, help="grid YAML, or a name in sdwork/data/grids/ (default, ci)")
    s.add_argument("--out", required=True, help="run folder, e.g. runs/sweep; results.jsonl lands there")
    s.add_argument("--model", help="model spec: tiny, tiny-random, a diffusers folder or hub id (default: the grid's)")
    s.add_argument("--engine", choices=["coremltools", "sdwork", "torch"], help="override the grid's engine")
    s.add_argument("--scorer", help="CLIP scorer: tiny, tiny-random, a folder or hub id (default: the grid's)")
    s.add_argument("--attention", default="original", choices=["original", "split_einsum", "split_einsum_v2"],
                   help="UNet layout of the packages (split_einsum_v2: the Neural Engine's); rows record it")
    s.add_argument("--limit", type=_positive, help="run at most this many of the grid's recipes (in grid order)")
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

    b = sub.add_parser("bundle", help="write the Resources folder Apple's Swift StableDiffusion package loads")
    b.add_argument("source", help="a run folder (see --variant) or a folder of .mlpackage files")
    b.add_argument("--out", required=True, help="folder to write Resources/ into")
    b.add_argument("--variant", help="the run's row to bundle (default: fp16, the unpalettized packages)")
    b.add_argument("--chunks", type=int, choices=[1, 2], default=1,
                   help="2: the UNet as UnetChunk1 + UnetChunk2 (iOS, unless its weights are 6-bit or smaller)")
    b.set_defaults(func=_bundle)
    return p


def _sweep(args) -> int:
    import time

    from sdwork.experiments.experiment import Experiment
    from sdwork.experiments.results import summary_table

    t0 = time.perf_counter()
    exp, recipes = Experiment.from_grid(args.grid, args.out, model=args.model, engine=args.engine,
                                        scorer=args.scorer or "grid", limit=args.limit,
                                        progress=not args.no_progress, keep_packages=not args.drop_packages,
                                        attention=args.attention)
    df = exp.sweep(recipes)
    failed = df[df.get("status", "ok") == "failed"] if "status" in df else df.iloc[:0]
    print(_table(summary_table(df.drop(failed.index))))
    for _, r in failed.iterrows():
        print(f"failed: {r['name']}: {r['error']}", file=sys.stderr)
    print(f"{len(df) - len(failed)} variants of this grid in {exp.out / 'results.jsonl'} "
          f"({time.perf_counter() - t0:.0f} s)" + (f", {len(failed)} failed (a rerun retries them)" if len(failed) else ""))
    return 2 if len(failed) else 0


def _results(args) -> int:
    from sdwork.errors import ConfigError
    from sdwork.experiments.results import load_results, summary_table

    df = load_results(args.run)
    if df.empty:
        raise ConfigError(f"no results in {args.run}; run a sweep into it first (sdwork sweep --out {args.run})")
    if args.sort not in df:
        raise ConfigError(f"--sort {args.sort!r} is not a column; choose from {', '.join(summary_table(df).columns)}")
    print(_table(summary_table(df, sort=args.sort)))
    return 0


def _table(df) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _sizes(args) -> int:
    from sdwork.coreml.sizes import package_sizes

    for p in args.packages:
        s = package_sizes(p)
        print(p, " ".join(f"{k}={v}" for k, v in s.summary().items()))
        if args.layers:
            print(s.table().to_string(index=False))
    return 0


def _bundle(args) -> int:
    from sdwork.bundle import bundle

    print(bundle(args.source, args.out, variant=args.variant, chunks=args.chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def _whole(text: str, lo: int, low: str, hint: str = "", fix: str = "") -> int:
    """An argparse integer of at least `lo`; `low` says what a smaller one should be, `fix` what to do."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{hint}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"{low}, got {n}{fix}")
    return n


def _positive(text: str) -> int:
    return _whole(text, 1, "must be at least 1", fix="; leave --limit out to run every recipe")


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
    s.add_argument("--executor", choices=["serial", "dask"], default="serial",
                   help="where variants run: here one after another, or as tasks on a Dask cluster (docs/dask.md)")
    s.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: a running scheduler, e.g. tcp://head:8786")
    s.add_argument("--workers", type=int, metavar="N",
                   help="with --executor dask: start a local cluster of N worker processes (default 2)")
    s.add_argument("--packages", metavar="DIR", type=_folder,
                   help="fp16 packages converted before (notebook 01's runs/convert/<model>, convert_pipeline): "
                        "reused once their metadata shows this model's weights and layout (refused otherwise). "
                        "Default: converted once into the sdwork cache, $SDWORK_CACHE/fp16-packages "
                        "(else ~/.cache/sdwork/fp16-packages), and reused by every later sweep")
    _generation_options(s)
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


DEVICES = ("cpu", "cuda", "mps", "auto")  # sdwork.generate.DEVICES (not imported: --help stays fast)


def _folder(text: str) -> str:
    from sdwork.paths import resolve

    if not resolve(text).is_dir():
        raise argparse.ArgumentTypeError(f"no folder at {resolve(text)}; pass the folder the .mlpackage files are in")
    return text


def _seed(text: str) -> int:
    return _whole(text, 0, "seeds are 0 or more", "; give e.g. --seed 0")


def _count(text: str) -> int:
    return _whole(text, 1, "must be at least 1")


def _side(text: str) -> int:
    n = _count(text)
    if n % 8:
        raise argparse.ArgumentTypeError(f"{n} is not a multiple of 8 (the VAE's scale); e.g. {max(8, n // 8 * 8)}")
    return n


def _guidance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give e.g. --guidance 7.5") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _generation_options(s) -> None:
    g = s.add_argument_group("generation (each overrides the grid's 'generation' section; with --prompt and "
                             "--seed given, a grid needs none)")
    g.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="a prompt (repeat for several); replaces the grid's prompts")
    g.add_argument("--seed", action="append", dest="seeds", type=_seed, metavar="N",
                   help="a seed (repeat for several); images are prompts x seeds")
    g.add_argument("--steps", type=_count, help="denoising steps per image")
    g.add_argument("--size", type=_side, metavar="PX", help="image height and width in pixels (a multiple of 8); "
                   "default: the model's native size")
    g.add_argument("--height", type=_side, metavar="PX")
    g.add_argument("--width", type=_side, metavar="PX")
    g.add_argument("--guidance", type=_guidance, help="classifier-free guidance scale")
    g.add_argument("--threads", type=_count, help="torch threads while generating (part of the baseline's key)")
    g.add_argument("--device", choices=DEVICES, help="where images are generated; auto: cuda, else mps, else cpu")


def _generation(args) -> dict:
    """The generation options given, as GenSettings fields."""
    from sdwork.errors import ConfigError

    if args.size is not None and (args.height is not None or args.width is not None):
        raise ConfigError("--size sets both height and width; give --size alone, or --height and --width")
    out = dict(prompts=args.prompts and tuple(args.prompts), seeds=args.seeds and tuple(args.seeds),
               steps=args.steps, guidance=args.guidance, threads=args.threads, device=args.device,
               height=args.size or args.height, width=args.size or args.width)
    return {k: v for k, v in out.items() if v is not None}


def _sweep(args) -> int:
    import time

    from sdwork.experiments.executors import executor_for
    from sdwork.experiments.experiment import Experiment
    from sdwork.experiments.results import summary_table

    t0 = time.perf_counter()
    executor = executor_for(args.executor, args.scheduler, args.workers)
    if executor is not None:
        executor.check()  # a scheduler that does not answer: refused before the model loads
    exp, recipes = Experiment.from_grid(args.grid, args.out, model=args.model, engine=args.engine,
                                        scorer=args.scorer or "grid", limit=args.limit,
                                        progress=not args.no_progress, keep_packages=not args.drop_packages,
                                        attention=args.attention, generation=_generation(args),
                                        packages=args.packages)
    df = exp.sweep(recipes, executor=executor)
    failed = df[df.get("status", "ok") == "failed"] if "status" in df else df.iloc[:0]
    print(_table(summary_table(df.drop(failed.index))))
    for _, r in failed.iterrows():
        print(f"failed: {r['name']}: {r['error']}", file=sys.stderr)
    print(f"{len(df) - len(failed)} variants of this grid in {exp.out / 'results.jsonl'} "
          f"({time.perf_counter() - t0:.0f} s)" + (f", {len(failed)} failed (a rerun retries them)" if len(failed) else ""))
    if exp.packages_note:  # None when every variant was done already: no package was needed
        print(exp.packages_note)
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

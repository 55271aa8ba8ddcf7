"""Export + Core ML conversion of a full-size UNet (random init from data/configs) in each attention
layout: time, peak RSS, size.

    .venv/bin/python benchmarks/convert_full_unet.py [--arch sd21-base] [--attention original split_einsum_v2]

Converts the same UNet as ORIGINAL and SPLIT_EINSUM_V2 (Neural Engine) in one run and prints
each figure with its ratio to the first layout's, and writes runs/benchmarks/convert_full_unet.json.
Each conversion also builds and verifies the weight map. Heavy: about 6 GiB of memory and
a few minutes of both cores per layout.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GIB = 2**30
REFERENCE = {"convert_s": 78.0, "peak_rss_gib": 6.2, "package_gib": 1.61}  # SD 2.1-base UNet


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) so a phase is measured alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    status = Path("/proc/self/status")
    if status.exists():  # VmHWM honours the reset above; ru_maxrss does not
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # kB on Linux


def cpu_s() -> float:
    """This process's CPU time: on a shared machine wall time depends on the neighbours, this does not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd21-base", help="a folder of data/configs (sd21-base, sd15)")
    ap.add_argument("--attention", nargs="+", default=["original", "split_einsum_v2"],
                    help="UNet layouts to convert in this run; the first is the ratios' reference")
    ap.add_argument("--out", default=None, help="where the packages go (default runs/benchmarks/<arch>-unet)")
    ap.add_argument("--keep", action="store_true", help="keep the packages (1.6 GiB each) instead of deleting them")
    args = ap.parse_args()

    import torch

    from sdwork.convert.components import check_layout
    from sdwork.convert.fullsize import random_pipeline
    from sdwork.paths import run_dir

    for a in args.attention:
        check_layout("apple", a)
    torch.set_num_threads(2)
    out = Path(args.out) if args.out else run_dir(f"runs/benchmarks/{args.arch}-unet")
    shutil.rmtree(out, ignore_errors=True)

    t0 = time.perf_counter()
    pipe = random_pipeline(args.arch, parts=("unet",))
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    build_rss = peak_rss_gib()
    print(f"{args.arch} UNet, {n_params / 1e6:.1f} M parameters (random init, built in {build_s:.1f} s, "
          f"{build_rss:.2f} GiB)")
    runs = {a: measure(pipe, a, out / a) for a in args.attention}
    ref = runs[args.attention[0]]
    print(f"{'':32s}" + "".join(f"{a:>18s}" for a in runs))
    for k, label in (("convert_s", "export+convert+weight map (s)"), ("convert_cpu_s", "  CPU time, all threads (s)"),
                     ("peak_rss_gib", "peak RSS (GiB)"), ("package_gib", "package size (GiB)"),
                     ("package_weights_s", "package_weights (s)"), ("load_into_pipeline_s", "load into torch (s)")):
        print(f"{label:32s}" + "".join(f"{r[k]:10.2f} ({r[k] / ref[k]:4.2f}x)" for r in runs.values()))
    print(f"ratios are to {args.attention[0]} in this run; the project's earlier reference for ORIGINAL on "
          f"SD 2.1-base: {REFERENCE}")
    note = ("peak RSS is measured per layout from after the build (it includes the resident model)"
            if all(r["peak_rss_reset"] for r in runs.values()) else
            "note: peak RSS includes building the model (could not reset the peak counter)")
    print(note)
    result = dict(arch=args.arch, params=n_params, build_s=build_s, build_peak_rss_gib=build_rss, runs=runs,
                  ratios={a: {k: r[k] / ref[k] for k in REFERENCE} for a, r in runs.items()}, reference=REFERENCE)
    report = run_dir("runs/benchmarks/convert_full_unet.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print("written", report)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def measure(pipe, attention: str, out: Path) -> dict:
    """Convert the UNet in one layout, then read its weights back and load them into torch."""
    import gc

    from sdwork.convert import convert_component, load_packages_into_pipeline, package_size, package_weights

    gc.collect()
    reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_s()
    path = convert_component(pipe, "unet", out, target="iOS18", unet_batch=2, progress=False, attention=attention)
    convert_s, convert_cpu_s = time.perf_counter() - t0, cpu_s() - c0
    rss = peak_rss_gib()
    t0 = time.perf_counter()
    weights = package_weights(path)
    weights_s = time.perf_counter() - t0
    del weights
    t0 = time.perf_counter()
    load_packages_into_pipeline(pipe, {"unet": path})
    return dict(convert_s=convert_s, convert_cpu_s=convert_cpu_s, peak_rss_gib=rss, peak_rss_reset=reset,
                package_gib=package_size(path) / GIB, package_weights_s=weights_s,
                load_into_pipeline_s=time.perf_counter() - t0)


if __name__ == "__main__":
    main()

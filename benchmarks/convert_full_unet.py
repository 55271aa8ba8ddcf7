"""Export + Core ML conversion of a full-size UNet (random init from data/configs): time, peak RSS, size.

    .venv/bin/python benchmarks/convert_full_unet.py [--arch sd21-base] [--keep]

Prints each figure with its ratio to the reference measured on the project's 2-core
Linux machine (SD 2.1-base UNet: 78 s, 6.2 GiB peak, 1.61 GiB package) and writes
runs/benchmarks/convert_full_unet.json. The conversion here also builds and verifies
the weight map, which the reference did not; it is timed separately as well.
Heavy: about 6 GiB of memory and a minute or two of both cores.
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
    ap.add_argument("--out", default=None, help="where the package goes (default runs/benchmarks/<arch>-unet)")
    ap.add_argument("--keep", action="store_true", help="keep the package (1.6 GiB) instead of deleting it")
    args = ap.parse_args()

    import torch

    from sdwork.convert import convert_component, load_packages_into_pipeline, package_size, package_weights
    from sdwork.convert.fullsize import random_pipeline
    from sdwork.paths import run_dir

    torch.set_num_threads(2)
    out = Path(args.out) if args.out else run_dir(f"runs/benchmarks/{args.arch}-unet")
    shutil.rmtree(out, ignore_errors=True)

    t0 = time.perf_counter()
    pipe = random_pipeline(args.arch, parts=("unet",))
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    build_rss = peak_rss_gib()

    phase_reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), cpu_s()
    path = convert_component(pipe, "unet", out, target="iOS18", unet_batch=2, progress=False)
    convert_s, convert_cpu_s = time.perf_counter() - t0, cpu_s() - c0
    convert_rss = peak_rss_gib()

    t0 = time.perf_counter()
    weights = package_weights(path)
    weights_s = time.perf_counter() - t0
    del weights
    t0 = time.perf_counter()
    load_packages_into_pipeline(pipe, {"unet": path})
    load_s = time.perf_counter() - t0
    size = package_size(path) / GIB

    got = {"convert_s": convert_s, "peak_rss_gib": convert_rss, "package_gib": size}
    result = dict(arch=args.arch, params=n_params, build_s=build_s, build_peak_rss_gib=build_rss,
                  peak_rss_reset_after_build=phase_reset, convert_cpu_s=convert_cpu_s, package_weights_s=weights_s,
                  load_into_pipeline_s=load_s, **got,
                  ratios={k: got[k] / REFERENCE[k] for k in REFERENCE}, reference=REFERENCE)
    print(f"{args.arch} UNet, {n_params / 1e6:.1f} M parameters (random init, built in {build_s:.1f} s, "
          f"{build_rss:.2f} GiB)")
    print(f"{'':32s}{'this run':>10s}{'reference':>11s}{'ratio':>8s}")
    for k, label in (("convert_s", "export+convert+weight map (s)"), ("peak_rss_gib", "peak RSS (GiB)"),
                     ("package_gib", "package size (GiB)")):
        print(f"{label:32s}{got[k]:10.2f}{REFERENCE[k]:11.2f}{got[k] / REFERENCE[k]:8.2f}")
    print(f"conversion CPU time (user+sys, all threads): {convert_cpu_s:.1f} s")
    print(f"package_weights (read + decode): {weights_s:.1f} s; load_packages_into_pipeline: {load_s:.1f} s")
    if not phase_reset:
        print("note: peak RSS includes building the model (could not reset the peak counter)")
    else:
        print("note: peak RSS is measured from after the build, so it includes the resident model")
    report = run_dir("runs/benchmarks/convert_full_unet.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print("written", report)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

"""DKM vs post-training palettization of the UNet with the same recipe, on the embedded model.

    python benchmarks/dkm_vs_ptq.py                     # 2 and 3 bits, per-tensor, the default budget
    python benchmarks/dkm_vs_ptq.py --nbits 2 --steps 100 --model tiny-random

For each bit width: the post-training row (sdwork's exact k-means engine by
default, the sweep's default) and the DKM row land in one results table
(<out>/results.jsonl, the sweep's format), both scored against the same fp16
baseline on held-out prompts. Prints the metrics side by side, the wall time
of each phase, and the process's peak resident memory. Issue 8 asks for DKM
to clearly beat post-training palettization at 2 and 3 bits within 15 minutes.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import yaml  # noqa: E402

from sdwork import dkm, sweep  # noqa: E402
from sdwork.generate import GenSettings  # noqa: E402
from sdwork.load import ROOT  # noqa: E402

METRICS = ("psnr", "ssim", "clip_image_image", "clip_text_image")


def held_out_generation() -> dict:
    """The default sweep's generation settings (held-out prompts), so rows compare with it."""
    return yaml.safe_load((ROOT / "data" / "grids" / "default.yaml").read_text())["generation"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--nbits", type=int, nargs="+", default=[2, 3])
    p.add_argument("--granularity", default="per_tensor")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=dkm.DKMSettings.steps)
    p.add_argument("--lr", type=float, default=dkm.DKMSettings.lr)
    p.add_argument("--batch", type=int, default=dkm.DKMSettings.batch)
    p.add_argument("--tau", type=float, default=dkm.DKMSettings.tau, help="DKM softmax temperature")
    p.add_argument("--ptq-engine", default="sdwork", help="post-training engine: sdwork | coremltools | torch")
    p.add_argument("--scorer", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-dkm")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    progress = not a.no_progress

    t0, c0 = time.perf_counter(), time.process_time()
    gen = {**held_out_generation(), "threads": a.threads}
    settings = [dkm.DKMSettings(nbits=n, granularity=a.granularity, group_size=a.group_size, steps=a.steps,
                                lr=a.lr, batch=a.batch, tau=a.tau, threads=a.threads) for n in a.nbits]
    config = sweep.SweepConfig(a.model, [s.recipe(a.ptq_engine) for s in settings], GenSettings(**gen), a.scorer)
    ctx = sweep.prepare(config, a.out, progress=progress)
    t_prep = time.perf_counter() - t0
    sweep.run_sweep(config, a.out, progress=progress, ctx=ctx)
    t_ptq = time.perf_counter() - t0 - t_prep
    dkm_s = {}
    for s in settings:
        t1 = time.perf_counter()
        dkm.run_variant(ctx, s, progress=progress)
        dkm_s[s.name] = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    results = sweep.load_results(a.out).set_index("name")
    print(f"\nmodel {a.model}, {len(config.settings.pairs)} images ({config.settings.steps} steps, guidance "
          f"{config.settings.guidance}), scorer {results['clip_model'].dropna().iloc[0] if 'clip_model' in results else '-'}")
    print(f"{'variant':28s} {'MB':>6s} " + " ".join(f"{m:>16s}" for m in METRICS))
    for s in settings:
        for name in (s.recipe(a.ptq_engine).name, s.name):
            r = results.loc[name]
            print(f"{name:28s} {r['size_bytes'] / 1e6:6.3f} " + " ".join(f"{r[m]:16.4f}" for m in METRICS))
        ptq, ours = results.loc[s.recipe(a.ptq_engine).name], results.loc[s.name]
        wins = [m for m in METRICS if ours[m] > ptq[m]]
        print(f"  -> DKM better on {len(wins)}/4 ({', '.join(wins) or 'none'}); "
              f"PSNR {ours['psnr'] - ptq['psnr']:+.2f} dB, SSIM {ours['ssim'] - ptq['ssim']:+.4f}; "
              f"DKM phase {dkm_s[s.name]:.0f} s (training {ours['train_s']:.0f} s wall, {ours['train_cpu_s']:.0f} s CPU)")
    total = time.perf_counter() - t0
    print(f"\ntimes: prepare (baseline + fp16 packages) {t_prep:.0f} s, post-training {t_ptq:.0f} s, "
          f"DKM {sum(dkm_s.values()):.0f} s, total {total:.0f} s ({total / 60:.1f} min) wall, "
          f"{time.process_time() - c0:.0f} s CPU (wall exceeds CPU/threads when other jobs share the machine)")
    print(f"peak resident memory of this process: {peak:.2f} GiB; results: {a.out / sweep.RESULTS}")


if __name__ == "__main__":
    main()

"""Mixed-bit recipes of the UNet at exact budgets: the knapsack allocator against Apple's method,
the greedy and uniform palettization (issue 21).

    python benchmarks/mixed_bit.py [--model tiny] [--out runs/mixed-bit-bench]    # ~25 min on 2 busy cores
    python benchmarks/mixed_bit.py --prompts 2 --seeds 1 --budgets 3 4              # a quicker look
    python benchmarks/mixed_bit.py --report-only                                   # print the last report

Runs sdwork.experiments.allocate.compare on the embedded model: one sensitivity table (every
UNet weight palettized alone at bits 1, 2, 3, 4, 6, 8, per-tensor and g=16, measured with the
experiment's sampler: 20 steps), Apple's cumulative pass on it, then at each budget (2.5, 3,
3.5, 4, 5 bits per weight of the UNet package, exact weight.bin bytes) the greedy (both
objectives), Apple's recipe and the allocator's proposals, each compressed, sized from its
package and scored against the fp16 baseline on the held-out prompts. Prints each method's
figures per budget and the share of budgets at which the allocator's kept recipe is at least
as good as Apple's and the greedy on both PSNR and SSIM. Writes <out>/report.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # coremltools' k-means can hang with several OpenMP workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdwork import Experiment, GenSettings  # noqa: E402
from sdwork.experiments import allocate  # noqa: E402
from sdwork.experiments.sensitivity import DEFAULT_PROMPTS, ProbeSettings, SensitivityConfig  # noqa: E402

HELD_OUT = [  # the default grid's held-out prompts (sdwork/data/grids/default.yaml)
    "a small green circle on a black background", "a small yellow triangle on a white background",
    "a large red square on a white background", "a large purple triangle on a black background",
    "a large orange circle on a gray background", "a small purple circle on a gray background",
]
UNIFORM = ["2-pt", "3-pt", "3-g16", "4-pt", "4-g16", "6-pt"]


def main():
    a = arguments()
    report_file = a.out / "report.json"
    if a.report_only:
        if not report_file.exists():
            raise SystemExit(f"no {report_file}: run the benchmark first")
        return print_report(json.loads(report_file.read_text()))
    settings = GenSettings(prompts=HELD_OUT[: a.prompts], seeds=tuple(range(a.seeds)), steps=a.steps, guidance=5.0,
                           threads=1)
    exp = Experiment(a.model, settings, scorer=None if a.scorer == "none" else a.scorer, out=a.out)
    probe = ProbeSettings(prompts=DEFAULT_PROMPTS, seeds=tuple(range(a.probe_seeds)), steps=a.probe_steps or a.steps)
    config = SensitivityConfig(model=a.model, probe=probe, nbits=a.nbits, group_sizes=(None, a.group_size),
                               grouped_nbits=a.grouped_nbits, max_layers=a.max_layers)
    reference = None
    if a.reference_probe_steps:  # notebook 03's default probe: what the greedy and Apple's method had before
        reference = dataclasses.replace(config, probe=dataclasses.replace(probe, steps=a.reference_probe_steps))
    c = allocate.compare(exp, config, bits=a.budgets, rounds=a.rounds, top_k=a.top_k, apple=not a.no_apple,
                         apple_per_tensor=not a.apple_grouped, uniform=a.uniform,
                         joint=allocate.joint_probe(settings, a.joint_seeds), reference=reference, engine=a.engine)
    uniform = c.results[c.results["method"] == "uniform"]
    report = dict(model=a.model, settings=dict(prompts=len(settings.prompts), seeds=len(settings.seeds),
                                               steps=settings.steps),
                  summary=c.summary.to_dict("records"), cost=c.cost, seconds=c.seconds, win_ratio=c.win_ratio,
                  uniform=uniform[["name", "bits_per_weight", "psnr", "ssim"]].to_dict("records"),
                  tried=c.rows(["knapsack-try"])[["target_bits", "proposal", "psnr", "ssim", "probe_image_psnr"]]
                  .to_dict("records"))
    report_file.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", type=Path, default=Path("runs/mixed-bit-bench"))
    p.add_argument("--scorer", default="tiny", help="CLIP scorer; 'none' for PSNR/SSIM only")
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0],
                   help="bits per weight of the UNet package (exact weight.bin bytes)")
    p.add_argument("--prompts", type=int, default=len(HELD_OUT), help="how many held-out prompts score a recipe")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--probe-steps", type=int, default=None, help="sensitivity probe steps (default: --steps)")
    p.add_argument("--probe-seeds", type=int, default=1)
    p.add_argument("--reference-probe-steps", type=int, default=4,
                   help="also run the greedy and Apple's method on a table probed with this many steps (0: skip)")
    p.add_argument("--joint-seeds", type=int, default=1,
                   help="seeds of the joint probe (the held-out prompts on seeds after the experiment's)")
    p.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="candidate bit widths")
    p.add_argument("--group-size", type=int, default=16, help="candidate LUT group size besides per-tensor")
    p.add_argument("--grouped-nbits", type=int, nargs="+", default=None,
                   help="bit widths that also get the grouped candidate (default: all)")
    p.add_argument("--max-layers", type=int, default=None, help="analyse only the first n layers (dry runs)")
    p.add_argument("--rounds", type=int, default=1, help="interaction-correction rounds of the allocator")
    p.add_argument("--top-k", type=int, default=4, help="allocator proposals measured per budget")
    p.add_argument("--no-apple", action="store_true", help="skip Apple's method (and its cumulative pass)")
    p.add_argument("--apple-grouped", action="store_true",
                   help="Apple's cumulative pass on grouped candidates too (Apple's scripts: per-tensor only)")
    p.add_argument("--uniform", nargs="*", default=UNIFORM, help="uniform recipes measured for reference")
    p.add_argument("--engine", default="sdwork", choices=["sdwork", "coremltools"])
    p.add_argument("--report-only", action="store_true", help="print <out>/report.json again")
    return p.parse_args()


def print_report(rep: dict) -> None:
    s = rep["settings"]
    print(f"\nmodel {rep['model']}: every recipe scored on {s['prompts']} prompts x {s['seeds']} seeds, "
          f"{s['steps']} steps, against the fp16 baseline")
    head = f"{'budget':>6s} {'method':26s} {'bits':>6s} {'bytes':>9s} {'pred==pkg':>9s} {'PSNR':>7s} {'SSIM':>7s}  kept / wins"
    print(head)
    for r in rep["summary"]:
        if r.get("error") == r.get("error") and r.get("error"):  # NaN-safe: a row with an error message
            print(f"{r['target_bits']:6g} {r['method']:26s} {r['error']}")
            continue
        exact = "yes" if r.get("predicted_bytes") == r["bytes"] else "NO"
        tail = f"  {r.get('picked')} / {'wins' if r.get('wins') else 'LOSES'}" if r["method"] == "knapsack" else ""
        print(f"{r['target_bits']:6g} {r['method']:26s} {r['bits']:6.3f} {int(r['bytes']):9d} {exact:>9s} "
              f"{r['psnr']:7.2f} {r['ssim']:7.4f}{tail}")
    for u in rep.get("uniform", []):
        print(f"{'':6s} {'uniform':26s} {u['bits_per_weight']:6.3f} {'':9s} {'':9s} {u['psnr']:7.2f} {u['ssim']:7.4f}"
              f"  {u['name']}")
    if rep.get("tried"):
        print("\nthe allocator's proposals, each measured (probe: the joint probe's image PSNR)")
        for t in rep["tried"]:
            print(f"{t['target_bits']:6g} {t['proposal']:26s} {t['psnr']:7.2f} {t['ssim']:7.4f}  probe "
                  f"{t['probe_image_psnr']:.2f}")
    kept = [r for r in rep["summary"] if r["method"] == "knapsack" and r.get("wins") == r.get("wins")
            and "wins" in r]
    print(f"\nknapsack at least as good as Apple's and the greedy (same table) on PSNR and SSIM at "
          f"{sum(bool(r['wins']) for r in kept)}/{len(kept)} budgets (ratio {rep['win_ratio']:.2f})")
    ref = [r for r in kept if r.get("wins_reference") == r.get("wins_reference") and "wins_reference" in r]
    if ref:
        print(f"knapsack at least as good as the reference table's greedy and Apple on PSNR and SSIM at "
              f"{sum(bool(r['wins_reference']) for r in ref)}/{len(ref)} budgets")
    c = rep["cost"]
    for name in ("sensitivity", "reference"):
        if name in c:
            t = c[name]
            print(f"{name} table: {t['cells']} cells, {t['seconds']} s of probe runs ({t['probe_images']} images, "
                  f"{t['probe_steps']} steps; this run measured {t['measured_now']} and reused {t['reused']}); "
                  f"Apple's cumulative pass {t['cumulative_s']} s now")
    print(f"allocator: {c['probes']} joint-probe runs; {c['variants']} variants through Experiment.run")
    print("seconds:", rep["seconds"])


if __name__ == "__main__":
    main()

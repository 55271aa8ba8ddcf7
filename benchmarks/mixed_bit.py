"""Mixed-bit against uniform palettization of the UNet at equal or smaller size (issue 7).

    python benchmarks/mixed_bit.py [--model tiny] [--out runs/mixed-bit-bench] [--objectives latent_mse image_mse]
    python benchmarks/mixed_bit.py --nbits 2 3 4 6 8 --grouped-nbits 3 4 --apple-per-tensor   # ~15 min, as reported
    python benchmarks/mixed_bit.py --report-only        # print the rows already measured

Runs the study notebook 03 runs (sdwork.experiments.mixedbit.study) on the embedded model:
uniform 4-bit and 3-bit UNet recipes (per-tensor and g=16); the per-layer sensitivity
analysis (cached: a rerun resumes); mixed-bit recipes (greedy, one per objective, and Apple's
cumulative method) no larger than the smaller uniform package at each bit width; every recipe
compressed, sized exactly from its package and scored against the fp16 baseline on held-out
prompts (20 steps). Prints each variant against the reference measured in the same run
(uniform 4-bit per-tensor): size ratio, PSNR and SSIM differences, and whether each mixed
recipe beats both uniform 4-bit recipes on PSNR and SSIM. Writes <out>/report.json beside
the experiment's results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # coremltools' k-means can hang with several OpenMP workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdwork import Experiment, GenSettings  # noqa: E402
from sdwork.experiments import mixedbit as mb  # noqa: E402
from sdwork.experiments.results import load_results  # noqa: E402
from sdwork.experiments.sensitivity import ProbeSettings, SensitivityConfig  # noqa: E402

HELD_OUT = [  # the default grid's held-out prompts (sdwork/data/grids/default.yaml)
    "a small green circle on a black background", "a small yellow triangle on a white background",
    "a large red square on a white background", "a large purple triangle on a black background",
    "a large orange circle on a gray background", "a small purple circle on a gray background",
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", type=Path, default=Path("runs/mixed-bit-bench"))
    p.add_argument("--scorer", default="tiny", help="CLIP scorer; 'none' for PSNR/SSIM only")
    p.add_argument("--objectives", nargs="+", default=["latent_mse", "image_mse"], choices=mb.OBJECTIVES,
                   help="the greedy's additive drift; one greedy recipe per objective and budget")
    p.add_argument("--probe-steps", type=int, default=4)
    p.add_argument("--probe-seeds", type=int, default=1)
    p.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="candidate bit widths")
    p.add_argument("--group-size", type=int, default=16,
                   help="candidate LUT group size (besides per-tensor), and the grouped uniform recipes'")
    p.add_argument("--grouped-nbits", type=int, nargs="+", default=None,
                   help="bit widths that also get the grouped candidate (default: all)")
    p.add_argument("--max-layers", type=int, default=None, help="analyse only the first n layers (dry runs)")
    p.add_argument("--no-apple", action="store_true", help="skip Apple's method (and its cumulative pass)")
    p.add_argument("--apple-per-tensor", action="store_true",
                   help="Apple's cumulative pass on per-tensor candidates only, as Apple's scripts (half the time)")
    p.add_argument("--curve-bits", type=float, nargs="*", default=[], help="also measure the recipe curve here")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--engine", default="sdwork", choices=["sdwork", "coremltools"])
    p.add_argument("--report-only", action="store_true", help="print the report of the rows already in --out")
    a = p.parse_args()
    reference = mb.uniform_recipe(4, engine=a.engine).name
    if a.report_only:
        return report_only(a.out, reference)
    settings = GenSettings(prompts=HELD_OUT, seeds=tuple(range(a.seeds)), steps=a.steps, guidance=5.0, threads=1)
    exp = Experiment(a.model, settings, scorer=None if a.scorer == "none" else a.scorer, out=a.out)
    probe = ProbeSettings(seeds=tuple(range(a.probe_seeds)), steps=a.probe_steps)
    config = SensitivityConfig(model=a.model, probe=probe, nbits=a.nbits, group_sizes=(None, a.group_size),
                               grouped_nbits=a.grouped_nbits, max_layers=a.max_layers)
    study = mb.study(exp, config, match_bits=a.bits, match_group=a.group_size,
                     methods=("greedy",) if a.no_apple else ("greedy", "apple"), objective=a.objectives,
                     curve_bits=a.curve_bits, apple_per_tensor=a.apple_per_tensor, engine=a.engine)
    results = study.results
    report = summarise(results, reference, uniform_names=list(results.loc[results["method"] == "uniform", "name"]),
                       mixed_names=list(results.loc[results["method"] != "uniform", "name"]))
    report.update(model=a.model, objectives=a.objectives, layers=study.layers, sensitivity_rows=len(study.sensitivity),
                  seconds=study.seconds, same_as=study.same_as.set_index("name")["same_as"].to_dict())
    (exp.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print_report(report)


def report_only(out: Path, reference: str) -> None:
    results = load_results(out)
    if results.empty:
        raise SystemExit(f"no results in {out}: run the benchmark first")
    uniform = list(results.loc[results["method"] == "uniform", "name"])
    mixed = list(results.loc[results["method"].isin(mb.METHODS), "name"])
    report = summarise(results, reference, uniform, mixed)
    report.update(model=results["model"].iloc[0], objectives=sorted(set(results["objective"].dropna())),
                  layers="?", sensitivity_rows="?", seconds="(not run: --report-only)")
    print_report(report)


def summarise(results, reference: str, uniform_names, mixed_names) -> dict:
    df = results.set_index("name")
    if reference not in df.index:
        raise SystemExit(f"no row {reference} (uniform 4-bit per-tensor, the reference): keep 4 in --bits")
    ref = df.loc[reference]
    rows = []
    for name in list(dict.fromkeys(uniform_names + mixed_names)):
        r = df.loc[name]
        method = r.get("method")
        if method == "greedy":
            method += "/" + str(r.get("objective")).split("_")[0]  # greedy/latent, greedy/image
        rows.append(dict(name=name, method=method, target=_text(r.get("target")), bits=float(r["bits_per_weight"]),
                         bytes_unet=int(r["bytes_unet"]), size_ratio=r["bytes_unet"] / ref["bytes_unet"],
                         psnr=float(r["psnr"]), ssim=float(r["ssim"]), d_psnr=float(r["psnr"] - ref["psnr"]),
                         d_ssim=float(r["ssim"] - ref["ssim"]),
                         clip=float(r["clip_image_image"]) if "clip_image_image" in r else None,
                         probe_latent_psnr=r.get("probe_latent_psnr"), same_as=_text(r.get("same_as"))))
    four = [df.loc[n] for n in uniform_names if df.loc[n, "nbits"] == 4]
    verdicts = {}
    for name in dict.fromkeys(mixed_names):
        m = df.loc[name]
        verdicts[name] = all(m["bytes_unet"] <= u["bytes_unet"] and m["psnr"] > u["psnr"] and m["ssim"] > u["ssim"]
                             for u in four)
    return dict(reference=reference, rows=rows, beats_uniform_4bit=verdicts)


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def print_report(rep: dict) -> None:
    print(f"\nreference: {rep['reference']} (measured in this run); model {rep['model']}, "
          f"{rep['layers']} layers, {rep['sensitivity_rows']} sensitivity rows, greedy objectives {rep['objectives']}")
    head = f"{'variant':34s} {'method':13s} {'target':6s} {'bits':>6s} {'size/ref':>8s} {'PSNR':>7s} {'dPSNR':>7s} " \
           f"{'SSIM':>7s} {'dSSIM':>8s} {'CLIP':>7s}"
    print(head)
    for r in rep["rows"]:
        clip = f"{r['clip']:.4f}" if r["clip"] is not None else "-"
        print(f"{r['name'][:34]:34s} {str(r['method']):13s} {r['target'][:6]:6s} {r['bits']:6.3f} "
              f"{r['size_ratio']:8.4f} {r['psnr']:7.2f} {r['d_psnr']:+7.2f} {r['ssim']:7.4f} {r['d_ssim']:+8.4f} {clip:>7s}")
    for name, ok in rep["beats_uniform_4bit"].items():
        print(f"{name}: {'beats' if ok else 'does NOT beat'} uniform 4-bit per-tensor and g=16 on PSNR and SSIM "
              "at equal or smaller size")
    for name, first in rep.get("same_as", {}).items():
        print(f"{name}: the same recipe as {first} (its row copies that measurement)")
    print("seconds:", rep["seconds"])


if __name__ == "__main__":
    main()

"""Quality bars of the embedded default model (data/models), printed against their targets.

    python benchmarks/tiny_quality.py [--model tiny] [--clip tiny] [--steps 20] [--seeds 4]

Targets (issue 3): scorer ranking >= 95%; held-out prompts: colour >= 90%,
shape >= 80% (pixel judge and CLIP scorer); <= 1 s per image at 20 steps.
Writes runs/tiny-quality/report.json and a grid of the generated images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from sdwork.metrics import ClipScorer  # noqa: E402
from sdwork.pipeline import load_pipeline  # noqa: E402
from sdwork.tiny import quality  # noqa: E402

TARGETS = dict(scorer_ranking=0.95, pixel_colour=0.90, pixel_shape=0.80, clip_colour=0.90, clip_shape=0.80)
MAX_SECONDS = 1.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--clip", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("runs/tiny-quality"))
    a = p.parse_args()
    scorer = ClipScorer(a.clip)
    pipe = load_pipeline(a.model)
    ranking = quality.scorer_ranking(scorer)
    gen = quality.prompt_following(pipe, scorer, seeds=range(a.seeds), steps=a.steps, guidance=a.guidance)
    images = gen.pop("images")
    report = dict(model=a.model, clip=a.clip, scorer_ranking=ranking, **gen)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    rows = [np.concatenate(list(images[i : i + a.seeds]), axis=1) for i in range(0, len(images), a.seeds)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(a.out / "heldout_grid.png")
    ok = True
    for k, target in TARGETS.items():
        ok &= report[k] >= target
        print(f"{k:16s} {report[k]:6.3f}  target >= {target:.2f}  ratio {report[k] / target:5.2f}")
    t = report["seconds_per_image"]
    ok &= t <= MAX_SECONDS
    print(f"{'s/image':16s} {t:6.3f}  target <= {MAX_SECONDS:.2f}  ratio {t / MAX_SECONDS:5.2f}")
    print(f"pixel size {report['pixel_size']:.3f}, background {report['pixel_background']:.3f}")
    print("ALL BARS MET" if ok else "SOME BARS MISSED", f"-> {a.out / 'report.json'}")


if __name__ == "__main__":
    main()

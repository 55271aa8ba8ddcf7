"""How often the pixel judge (sdwork/tiny/judge.py) reads the shape right, on images whose shape is known.

    python benchmarks/judge_accuracy.py [--model tiny] [--per-combo 8] [--noise 0,0.5,1]

Labelled images: dataset images of all 108 combinations as drawn ("clean", the reference of this
run), their VAE round trips through the model's own VAE, and round trips with Gaussian noise
added to the latents (x their std): blurred and damaged the way generated images are. The judge
decides the shape bars of benchmarks/tiny_quality.py, so its own error belongs beside them.
Prints shape accuracy per set (and as a ratio of the clean set's), per shape, and the confusion.
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

from sdwork.load import load_pipeline  # noqa: E402
from sdwork.tiny import dataset, quality  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--per-combo", type=int, default=8)
    p.add_argument("--noise", default="0,0.5,1")
    p.add_argument("--out", type=Path, default=Path("runs/judge-accuracy"))
    a = p.parse_args()
    vae = load_pipeline(a.model, progress=False).vae.eval()
    sets, targets = quality.labelled_round_trips(vae, a.per_combo, noise=[float(s) for s in a.noise.split(",")])
    report, ref = {}, None
    for name, images in sets.items():
        conf = quality.shape_confusion(images, targets)
        acc = float(np.trace(conf[:, :-1]) / conf.sum())
        ref = acc if ref is None else ref
        per = {s: round(float(conf[i, i] / conf[i].sum()), 3) for i, s in enumerate(dataset.SHAPES)}
        report[name] = dict(n=int(conf.sum()), shape=acc, per_shape=per, confusion=conf.tolist())
        print(f"{name:10s} shape {acc:.3f}  ratio to clean {acc / ref:.3f}  per shape {per}")
        print("           rows true, columns judged " + " ".join(dataset.SHAPES) + " none: " + str(conf.tolist()))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

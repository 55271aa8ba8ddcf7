"""How long `python -m sdwork.tiny.train` takes from scratch on this machine.

    python benchmarks/tiny_train_time.py [--steps 30] [--threads 2] [--repeat 2]

Times a few steps of every stage with the real batch sizes (after a warm-up
step), extrapolates to the configured step counts, and prints the total as a
ratio of the 90-minute budget (issue 3). Run it on an idle machine. Each stage
is timed --repeat times and the fastest kept: on this machine one run right
after other work read 80 minutes where the next read 61.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sdwork.tiny import train  # noqa: E402

BUDGET_S = 90 * 60
STAGE_STEPS = {"vae": "vae_steps", "vae_decoder": "decoder_steps", "unet": "unet_steps", "clip": "clip_steps"}


def time_stage(stage: str, cfg: dict, work: Path, steps: int, repeat: int = 1) -> float:
    """Seconds per step of `stage`, from runs of 1 and 1+steps steps (the difference drops set-up);
    the fastest of `repeat` such measurements (background load only ever slows a run down)."""
    return min(_time_stage_once(stage, cfg, work, steps) for _ in range(repeat))


def _time_stage_once(stage: str, cfg: dict, work: Path, steps: int) -> float:
    key = STAGE_STEPS[stage]
    durations = []
    for n in (1, 1 + steps):
        for f in work.glob(f"{stage}*"):
            f.unlink()
        t0 = time.perf_counter()
        train.STAGES[stage](dict(cfg, **{key: n, "ckpt_every": 10**9}), work, progress=False)
        durations.append(time.perf_counter() - t0)
    return (durations[1] - durations[0]) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="time each stage this many times, keep the fastest")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dict(train.DEFAULTS)
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        train.train_data(cfg, work)
        data_s = time.perf_counter() - t0
        print(f"{'dataset':12s} {data_s:7.1f} s")
        total += data_s
        for stage, key in STAGE_STEPS.items():
            per = time_stage(stage, cfg, work, a.steps, a.repeat)
            cfg[key] = 1 + a.steps  # what the stage in `work` was last trained with: later stages read it
            full = per * train.DEFAULTS[key]
            total += full
            print(f"{stage:12s} {per:7.3f} s/step x {train.DEFAULTS[key]:5d} steps = {full / 60:6.1f} min")
            if stage == "vae":  # later stages read the VAE's latents: encoding them is part of the run
                t0 = time.perf_counter()
                train.cache_latents(cfg, work)
                total += time.perf_counter() - t0
                print(f"{'latents':12s} {time.perf_counter() - t0:7.1f} s")
    print(f"{'total':12s} {total / 60:6.1f} min on {a.threads} threads; budget 90 min; ratio {total / BUDGET_S:.2f}")


if __name__ == "__main__":
    main()

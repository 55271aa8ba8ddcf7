"""Shared test set-up: never touch the network, keep runs small and deterministic."""
import os
import sys
from pathlib import Path

# before any Hugging Face import: their constants read the environment once
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # no display in CI


def tiny_specs() -> tuple[str, str]:
    """(pipeline spec, CLIP spec): the trained embedded model once it is in data/models, else random init."""
    from sdwork.paths import TINY, TINY_CLIP

    model = "tiny" if (TINY / "model_index.json").exists() else "tiny-random"
    clip = "tiny" if (TINY_CLIP / "config.json").exists() else "tiny-random"
    return model, clip

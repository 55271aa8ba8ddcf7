"""Shared test set-up: never touch the network, keep runs small and deterministic, and write
nothing into the checkout (the sdwork cache lives in a temporary folder for the session)."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# one cache for the whole session (notebook kernels inherit it), removed at exit
_CACHE = tempfile.mkdtemp(prefix="sdwork-test-cache-")
os.environ["SDWORK_CACHE"] = _CACHE
os.environ["NUMBA_CACHE_DIR"] = os.path.join(_CACHE, "numba")  # numba's cache=True writes beside the sources
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
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

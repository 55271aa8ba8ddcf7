"""The fp16 packages a pipeline's variants start from: converted once, cached by everything
they depend on (weights, components, target, UNet batch, attention layout, the export format
and coremltools' version) under `paths.cache_dir("fp16-packages")`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sdwork import paths
from sdwork.convert.export import FORMAT_VERSION, convert_pipeline
from sdwork.io import digest, write_json
from sdwork.weights import weights_hash

def cache_key(pipe, components, target: str = "iOS18", unet_batch: int = 2, io: str = "apple",
              attention: str = "original") -> dict:
    import coremltools

    return dict(weights=weights_hash(pipe), components=list(components), target=target, unet_batch=unet_batch,
                io=io, attention=attention, format=FORMAT_VERSION, coremltools=coremltools.__version__)


def fp16_packages(pipe, components, target: str = "iOS18", unet_batch: int = 2, progress: bool = True,
                  cache: Path | None = None, io: str = "apple", attention: str = "original") -> dict[str, Path]:
    """{component: fp16 package} of `pipe`'s weights, converted on first use (whole folder or nothing,
    so an interrupted conversion is never reused)."""
    key = cache_key(pipe, components, target, unet_batch, io, attention)
    root = Path(cache or paths.cache_dir("fp16-packages"))
    folder = root / digest(key)
    stamp = folder / "source.json"
    if not stamp.exists():
        tmp = root / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            written = convert_pipeline(pipe, tmp, components=components, target=target, unet_batch=unet_batch,
                                       progress=progress, io=io, attention=attention)
            write_json(tmp / "source.json", dict(key, packages={c: Path(p).name for c, p in written.items()}))
            tmp.rename(folder)
        except OSError:
            if not stamp.exists():  # not a lost race with another process: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    have = json.loads(stamp.read_text())
    return {c: folder / name for c, name in have["packages"].items()}

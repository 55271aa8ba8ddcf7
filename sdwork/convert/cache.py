"""The fp16 packages a pipeline's variants start from: converted once, cached by everything
they depend on (weights, components, target, UNet batch, attention layout, the export format
and coremltools' version) under `paths.cache_dir("fp16-packages")`, or packages a user converted
before (notebook 01, `convert_pipeline`), reused once their metadata shows they hold this very
pipeline in this layout (`user_packages`)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sdwork import paths
from sdwork.convert import components as C
from sdwork.convert.export import FORMAT_VERSION, convert_pipeline
from sdwork.errors import ConfigError, MismatchError
from sdwork.io import digest, write_json
from sdwork.weights import fp16_hash, weights_hash


def cache_key(pipe, components, target: str = "iOS18", unet_batch: int = 2, io: str = "apple",
              attention: str = "original") -> dict:
    import coremltools

    return dict(weights=weights_hash(pipe), components=list(components), target=target, unet_batch=unet_batch,
                io=io, attention=attention, format=FORMAT_VERSION, coremltools=coremltools.__version__)


def cache_root(cache: Path | None = None) -> Path:
    return Path(cache or paths.cache_dir("fp16-packages"))


def fp16_packages(pipe, components, target: str = "iOS18", unet_batch: int = 2, progress: bool = True,
                  cache: Path | None = None, io: str = "apple", attention: str = "original") -> dict[str, Path]:
    """{component: fp16 package} of `pipe`'s weights, converted on first use (whole folder or nothing,
    so an interrupted conversion is never reused; a killed one's leftovers go at the next start)."""
    key = cache_key(pipe, components, target, unet_batch, io, attention)
    root = cache_root(cache)
    folder = root / digest(key)
    stamp = folder / "source.json"
    if not stamp.exists():
        paths.remove_stale(root, ".tmp-*")
        tmp = root / f".tmp-{folder.name}-{paths.owner_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with paths.scratch():  # coremltools' temporary packages: removed with the block
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


def user_packages(pipe, folder, components, target: str = "iOS18", unet_batch: int = 2, io: str = "apple",
                  attention: str = "original") -> dict[str, Path]:
    """{component: package} of fp16 packages converted before into `folder`, each checked against
    `pipe` by its metadata (export format, component, the fp16 hash of the weights it holds,
    target, I/O layout, attention layout, shapes): refused, naming each difference, when made
    from other inputs. Nothing is written."""
    folder = paths.resolve(folder)
    if not folder.is_dir():
        raise ConfigError(f"packages={str(folder)!r} is no folder; pass the folder convert_pipeline (notebook 01) "
                          "wrote the .mlpackage files into, or leave it out to convert into the sdwork cache")
    want = dict(format=FORMAT_VERSION, target=target, io=io,
                shapes=C.Shapes.of(pipe, unet_batch, io, attention).__dict__)
    return {c: _checked(pipe, folder, c, dict(want, attention=attention if c == "unet" else "original"))
            for c in components}


def _checked(pipe, folder: Path, component: str, want: dict) -> Path:
    from sdwork.coreml.package import metadata

    path = folder / C.spec(component).package
    if not path.exists():
        raise ConfigError(f"{folder} has no {path.name} ({component}); convert it there "
                          f"(convert_pipeline(pipe, {str(folder)!r}, components=[..., {component!r}])) "
                          "or leave packages out to convert into the sdwork cache")
    meta = metadata(path)
    have = dict(meta, shapes=json.loads(meta["shapes"]) if "shapes" in meta else None)
    want = dict(want, component=component, source_weights=fp16_hash(C.owned_parameters(pipe, component)))
    diff = [f"{k}: {have.get(k)!r} there, {v!r} wanted" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise MismatchError(f"{path} was made from other inputs than this pipeline and layout ({'; '.join(diff)}); "
                            "convert this model into a new folder, or leave packages out to convert into the "
                            "sdwork cache")
    return path


def describe(packages: dict[str, Path]) -> str:
    """Where a set of fp16 packages lives, for a sweep's output."""
    folder = Path(next(iter(packages.values()))).parent
    if folder.parent == cache_root():
        where = (f"the sdwork cache, ${paths.CACHE_ENV}/fp16-packages: converted once per model and layout; "
                 "pass --packages DIR / packages= to reuse packages converted before")
    else:
        where = "converted before, checked against this model's weights and layout"
    return f"fp16 packages: {folder} ({where})"

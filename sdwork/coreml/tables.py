"""Tables of what was converted, read back from the packages themselves (not from our intentions)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from sdwork.coreml.package import metadata, open_package, package_size, weight_file_size


def package_table(packages: dict[str, Path]) -> pd.DataFrame:
    """Size on disk of each package and what it was converted for."""
    rows = []
    for component, path in packages.items():
        meta = metadata(path)
        rows.append(dict(component=component, package=Path(path).name, size_mb=package_size(path) / 2**20,
                         weights_mb=weight_file_size(path) / 2**20, target=meta.get("target"),
                         io=meta.get("io", "diffusers"), attention=meta.get("attention", "original"),
                         model=meta.get("model")))
    return pd.DataFrame(rows)


def io_table(packages: dict[str, Path]) -> pd.DataFrame:
    """Every input and output of every package: name, shape, dtype, meaning."""
    rows = []
    for component, path in packages.items():
        desc = open_package(path).get_spec().description
        for kind, features in (("input", desc.input), ("output", desc.output)):
            for f in features:
                arr = f.type.multiArrayType
                rows.append(dict(component=component, io=kind, name=f.name, shape=tuple(arr.shape),
                                 dtype=_dtype_name(arr.dataType),
                                 description=f.shortDescription))
    return pd.DataFrame(rows)


def _dtype_name(value: int) -> str:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    return ArrayFeatureType.ArrayDataType.Name(value).lower()

"""Apple's I/O contract for Stable Diffusion packages, and a package's spec checked against it.

Written out from Apple's ml-stable-diffusion (torch2coreml.py and the Swift pipeline, see
shared/APPLE_IO.md) independently of the converter's own tables, so the check can fail.
Dimensions: B = UNet batch, C = text width, S = tokens, L = latent channels, h = latent size,
H = image size.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sdwork.coreml.package import metadata
from sdwork.errors import PackageError
from sdwork.coreml.tables import io_table

# component -> [(io, name, shape in symbols, dtype)]
APPLE_CONTRACT = {
    "text_encoder": [("input", "input_ids", ("1", "S"), "float32"),
                     ("output", "last_hidden_state", ("1", "S", "C"), "float32"),
                     ("output", "pooled_outputs", ("1", "C"), "float32")],
    "unet": [("input", "sample", ("B", "L", "h", "h"), "float16"),
             ("input", "timestep", ("B",), "float16"),
             ("input", "encoder_hidden_states", ("B", "C", "1", "S"), "float16"),
             ("output", "noise_pred", ("B", "L", "h", "h"), "float32")],
    "vae_decoder": [("input", "z", ("1", "L", "h", "h"), "float16"),
                    ("output", "image", ("1", "3", "H", "H"), "float32")],
    "vae_encoder": [("input", "x", ("1", "3", "H", "H"), "float16"),
                    ("output", "latent", ("1", "2L", "h", "h"), "float32")],
}


def contract_table(packages: dict[str, Path]) -> pd.DataFrame:
    """One row per feature Apple's Swift package reads: what it expects, what the package has, and
    whether they match (name, shape and dtype). A feature the package lacks is a row with got = missing."""
    have = io_table(packages).set_index(["component", "io", "name"])
    rows = []
    for component, path in packages.items():
        dims = _dims(path)
        for io, name, symbols, dtype in APPLE_CONTRACT.get(component, []):
            shape = tuple(_value(s, dims) for s in symbols)
            key = (component, io, name)
            got = (f"{have.loc[key, 'shape']} {have.loc[key, 'dtype']}" if key in have.index else "missing")
            rows.append(dict(component=component, io=io, name=name,
                             apple=f"({', '.join(symbols)}) {dtype}", expected=f"{shape} {dtype}", got=got,
                             matches=got == f"{shape} {dtype}"))
    return pd.DataFrame(rows)


def _dims(package) -> dict[str, int]:
    raw = metadata(package).get("shapes")
    if not raw:
        raise PackageError(f"{package} records no shapes in its metadata: it was not made by sdwork.convert")
    s = json.loads(raw)
    return dict(B=s["unet_batch"], C=s["text_hidden"], S=s["seq_len"], L=s["latent_channels"],
                h=s["latent_size"], H=s["image_size"])


def _value(symbol: str, dims: dict[str, int]) -> int:
    if symbol.isdigit():
        return int(symbol)
    if symbol[0].isdigit():  # "2L"
        return int(symbol[0]) * dims[symbol[1:]]
    return dims[symbol]

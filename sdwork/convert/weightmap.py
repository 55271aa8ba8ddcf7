"""The verified mapping from torch parameter names to the const names of a package.

Built at conversion from the exported program's signature (placeholder -> parameter)
and checked against the values the package really holds. Every parameter ends in
one of four kinds:
  name      the const carries the parameter's own name, values equal after fp16 rounding
            (coremltools' rounding: see coreml_fp16)
  shared    coremltools deduplicated equal constants: the const of another parameter
            holds exactly this parameter's values
  folded    the value sits in a const with a generated name (GroupNorm's scale and
            shift become batch_norm gamma / beta), found by exact value
  identity  a norm scale of ones or shift of zeros that coremltools removed as a no-op
A weight compression can touch (2-D or more, over 2048 elements) must be `name` or
`shared`; anything not accounted for is an error, never silently skipped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdwork.errors import SdworkError
from sdwork.coreml.package import PackageError, metadata, open_package

WEIGHT_THRESHOLD = 2048  # coremltools' default: weights with more elements are compressed
SUFFIX = ".weightmap.json"


class WeightMapError(SdworkError, ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    const: str | None  # None for identity
    kind: str  # name | shared | folded | identity
    shape: tuple[int, ...]  # the torch parameter's shape
    const_shape: tuple[int, ...] | None = None


@dataclass
class WeightMap:
    component: str
    module: str  # pipeline attribute the names are relative to
    entries: dict[str, Entry] = field(default_factory=dict)
    weight_threshold: int = WEIGHT_THRESHOLD

    def consts(self) -> dict[str, str]:
        return {n: e.const for n, e in self.entries.items() if e.const is not None}

    def counts(self) -> dict[str, int]:
        kinds = [e.kind for e in self.entries.values()]
        return {k: kinds.count(k) for k in ("name", "shared", "folded", "identity")}

    def to_json(self, indent: int | None = 1) -> str:
        d = asdict(self)
        d["entries"] = {n: {k: v for k, v in asdict(e).items() if v is not None} for n, e in self.entries.items()}
        return json.dumps(d, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WeightMap":
        d = json.loads(text)
        entries = {n: Entry(e.get("const"), e["kind"], tuple(e["shape"]),
                            tuple(e["const_shape"]) if "const_shape" in e else None)
                   for n, e in d.pop("entries").items()}
        return cls(entries=entries, **d)


# ------------------------------------------------------------------ building
def build_weight_map(component: str, module: str, params: dict[str, torch.Tensor],
                     placeholders: dict[str, str], weights: dict[str, np.ndarray],
                     threshold: int = WEIGHT_THRESHOLD) -> WeightMap:
    """Map every parameter in `params` to a const in `weights` (see the module docstring).

    placeholders: exported placeholder name -> parameter name relative to the pipeline module.
    """
    by_param = {p: ph for ph, p in placeholders.items()}
    by_value = _value_index(weights)
    wm = WeightMap(component, module, weight_threshold=threshold)
    named: dict[str, str] = {}  # const -> parameter mapped to it by name
    pending = []
    for name, p in params.items():
        ref = _fp16(p)
        const = _named_const(by_param.get(name), weights)
        if const is None:
            pending.append((name, p, ref))
            continue
        got = weights[const]
        if got.size != ref.size or not _equal(got, ref):
            raise WeightMapError(
                f"{component}: const {const} carries the name of {name} but not its values "
                f"(shape {tuple(got.shape)} vs {tuple(p.shape)}): coremltools transformed the weight; "
                "this conversion cannot be verified"
            )
        named[const] = name
        wm.entries[name] = Entry(const, "name", tuple(p.shape), _shape_if_different(got, p))
    for name, p, ref in pending:
        wm.entries[name] = _unnamed_entry(component, name, p, ref, weights, by_value, named, threshold)
    return wm


# how coremltools names the const of an exported parameter: cast to fp16 by the fp16 pass,
# cast inside a LUT op (weights palettized on the torch side), or kept as is (fp32 compute)
_NAME_SUFFIXES = ("_to_fp16", "_cast_fp16", "")


def _named_const(placeholder: str | None, weights) -> str | None:
    if placeholder is None:
        return None
    for c in (placeholder + s for s in _NAME_SUFFIXES):
        if c in weights:
            return c
    return None


def compressible(p: torch.Tensor, threshold: int = WEIGHT_THRESHOLD) -> bool:
    """What coremltools' compression passes touch: more than `threshold` elements, 2-D or more
    (1-D tensors are never compressed, e.g. the 2560-channel GroupNorm scales of a full-size UNet)."""
    return p.ndim >= 2 and p.numel() > threshold


def _unnamed_entry(component, name, p, ref, weights, by_value, named, threshold) -> Entry:
    large = compressible(p, threshold)
    equal = sorted(c for c in by_value.get(_key(ref), []) if _equal(weights[c], ref))
    shared = [c for c in equal if c in named]
    folded = [c for c in equal if c not in named]
    if shared:
        return Entry(shared[0], "shared", tuple(p.shape), _shape_if_different(weights[shared[0]], p))
    # a scale of ones / shift of zeros is checked before folded consts: batch_norm's
    # generated variance (ones) and mean (zeros) consts would match it by value by chance
    if p.ndim == 1 and _is_identity(name, p):
        return Entry(None, "identity", tuple(p.shape))
    if folded:
        if large:
            raise WeightMapError(
                f"{component}: the weight {name} ({p.numel()} elements) was folded into the generated const "
                f"{folded[0]}: compression would not find it by name. Change the wrapper so coremltools keeps it"
            )
        return Entry(folded[0], "folded", tuple(p.shape), _shape_if_different(weights[folded[0]], p))
    raise WeightMapError(
        f"{component}: parameter {name} {tuple(p.shape)} is not in the package by name or by value: "
        "the conversion dropped or transformed it, so the package cannot be verified"
    )


def _is_identity(name: str, p: torch.Tensor) -> bool:
    if name.endswith("weight"):
        return bool((p == 1).all())
    if name.endswith("bias"):
        return bool((p == 0).all())
    return False


# tensors smaller than this keep an underflowing nonzero value as the smallest subnormal (coreml_fp16)
COREML_UNDERFLOW_BELOW = 400


def coreml_fp16(a: np.ndarray) -> np.ndarray:
    """fp16 as coremltools' fp16 pass stores a weight: round to nearest even, except that in a tensor
    of fewer than 400 elements a nonzero value that underflows to 0 becomes the smallest subnormal of
    its sign (add_fp16_cast._check_underflow_to_zero, meant for epsilons). Trained CLIP k_proj biases
    (about 1e-6 and below: softmax ignores them) hit this."""
    a = np.asarray(a, dtype=np.float32)
    h = a.astype(np.float16)
    if a.size < COREML_UNDERFLOW_BELOW:
        tiny = np.nextafter(np.float16(0), np.float16(1))
        under = (np.abs(a) > np.nextafter(np.float32(0), np.float32(1))) & (np.abs(h) <= tiny)
        h = np.where(under, np.copysign(tiny, a).astype(np.float16), h)
    return h


def _fp16(p: torch.Tensor) -> np.ndarray:
    return coreml_fp16(p.detach().float().cpu().numpy())


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and np.array_equal(a.reshape(-1).astype(np.float16), b.reshape(-1).astype(np.float16))


def _key(a: np.ndarray) -> tuple[int, str]:
    flat = a.reshape(-1).astype(np.float16) + np.float16(0)  # +0 turns -0 into 0, as array_equal sees them
    return a.size, hashlib.sha1(flat.tobytes()).hexdigest()


def _value_index(weights: dict[str, np.ndarray]) -> dict[tuple, list[str]]:
    index: dict[tuple, list[str]] = {}
    for c, v in weights.items():
        index.setdefault(_key(v), []).append(c)
    return index


def _shape_if_different(const: np.ndarray, p: torch.Tensor):
    return None if tuple(const.shape) == tuple(p.shape) else tuple(const.shape)


# ------------------------------------------------------------------ reading
def sidecar(package) -> Path:
    """<dir>/Unet.weightmap.json beside <dir>/Unet.mlpackage."""
    package = Path(package)
    return package.with_name(package.name.removesuffix(".mlpackage") + SUFFIX)


def read_weight_map(package) -> WeightMap:
    """The weight map stored in the package's metadata (it survives compression), cross-checked
    with the JSON file beside the package when there is one."""
    meta = metadata(package).get("weightmap")
    side = sidecar(package) if not _is_mlmodel(package) else None
    side_text = side.read_text() if side is not None and side.exists() else None
    if meta is None and side_text is None:
        raise PackageError(
            f"{package} has no sdwork weight map (neither in its metadata nor as {side}): it was not "
            "made by sdwork.convert; convert the pipeline with sdwork.convert.convert_pipeline"
        )
    wm = WeightMap.from_json(meta if meta is not None else side_text)
    if meta is not None and side_text is not None and WeightMap.from_json(side_text) != wm:
        raise PackageError(f"the weight map {side} does not match the one inside {package}: the JSON belongs "
                           "to another package; delete it or convert again")
    return wm


def load_weight_map(package) -> dict[str, str]:
    """{torch parameter name (relative to the pipeline module): const name} of a package."""
    return read_weight_map(package).consts()


def _is_mlmodel(package) -> bool:
    return not isinstance(package, (str, Path)) and open_package(package) is package

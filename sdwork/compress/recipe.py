"""A palettization recipe: what to compress, how, and with which engine.

A Recipe is validated when built, so an impossible request fails before any
work starts, with a message naming the fix. It round-trips through JSON, has a
short stable `name` (the row key of a sweep), and turns into the coremltools
config that `ct.optimize.coreml.palettize_weights` takes.

Defaults follow coremltools and Apple's ml-stable-diffusion: k-means, per-tensor,
weight_threshold 2048, and the text encoder plus the UNet compressed (what
`--quantize-nbits` does); the VAE decoder stays fp16 unless asked for, because
it is small and works in pixel space where errors show directly. The engine
defaults to "coremltools" (the reference implementation); the grids in
data/grids/ choose the faster "sdwork" drop-in, which takes the same configs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from sdwork import validate
from sdwork.convert.components import COMPONENTS
from sdwork.errors import ConfigError

NBITS = (1, 2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
MODES = ("kmeans", "uniform")
ENGINES = ("coremltools", "torch", "sdwork")
DEFAULT_COMPONENTS = ("text_encoder", "unet")
DEFAULT_WEIGHT_THRESHOLD = 2048  # coremltools' default: weights with more elements get compressed


@dataclass(frozen=True)
class LayerSpec:
    """A per-layer override: another bit width / granularity for one weight."""

    nbits: int
    granularity: str | None = None  # None: per_grouped_channel when group_size is given, else per_tensor
    group_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "granularity", implied_granularity(self.granularity, self.group_size))
        check_lut(self.nbits, self.granularity, self.group_size, cluster_dim=1, what="override")


@dataclass(frozen=True)
class Recipe:
    nbits: int
    granularity: str | None = None  # None: per_grouped_channel when group_size is given, else per_tensor
    group_size: int | None = None  # output channels sharing one LUT; LUTs per layer = C_out / group_size
    cluster_dim: int = 1  # >1: vector palettization, each LUT entry is a cluster_dim-long vector
    mode: str = "kmeans"
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    engine: str = "coremltools"
    # op (const) name -> LayerSpec, or None to leave that weight in fp16; sorted pairs keep it hashable
    overrides: tuple[tuple[str, LayerSpec | None], ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "granularity", implied_granularity(self.granularity, self.group_size))
        check_lut(self.nbits, self.granularity, self.group_size, self.cluster_dim, what="recipe")
        validate.choice("mode", self.mode, MODES)
        if self.cluster_dim > 1 and self.mode != "kmeans":
            raise ConfigError(f"cluster_dim={self.cluster_dim} (vector palettization) needs mode='kmeans'")
        validate.integer("weight_threshold", self.weight_threshold, lo=0)
        comps = (self.components,) if isinstance(self.components, str) else self.components
        comps = validate.sequence("components", comps, lambda w, c: validate.choice(w, c, COMPONENTS),
                                  "['text_encoder', 'unet']")
        object.__setattr__(self, "components", tuple(sorted(set(comps), key=COMPONENTS.index)))
        validate.choice("engine", self.engine, ENGINES)
        _check_engine(self)
        object.__setattr__(self, "overrides", _normalise_overrides(self.overrides))
        if self.overrides and self.engine == "torch":
            raise ConfigError("per-layer overrides are keyed by Core ML op names; use engine 'coremltools' or 'sdwork'")

    # --- identity -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Short stable id, e.g. 'km4-pt', 'km4-g16', 'un2-g4-cd2-wt4096-all-torch'."""
        parts = [("km" if self.mode == "kmeans" else "un") + str(self.nbits)]
        parts.append("pt" if self.granularity == "per_tensor" else f"g{self.group_size}")
        if self.cluster_dim != 1:
            parts.append(f"cd{self.cluster_dim}")
        if self.weight_threshold != DEFAULT_WEIGHT_THRESHOLD:
            parts.append(f"wt{self.weight_threshold}")
        if self.components != DEFAULT_COMPONENTS:
            parts.append("+".join(_SHORT[c] for c in self.components))
        if self.engine != "coremltools":
            parts.append(self.engine)
        if self.overrides:
            digest = hashlib.sha256(json.dumps(self.to_dict()["overrides"], sort_keys=True).encode())
            parts.append(f"ov{len(self.overrides)}-{digest.hexdigest()[:6]}")
        return "-".join(parts)

    @property
    def lut_entries(self) -> int:
        return 2**self.nbits

    # --- serialisation --------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["components"] = list(self.components)
        d["overrides"] = {k: (None if v is None else asdict(v)) for k, v in self.overrides}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = validate.known_keys("recipe", d, [f.name for f in fields(cls)])
        if "nbits" not in d:
            raise ConfigError(f"a recipe needs nbits (one of {', '.join(map(str, NBITS))})")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    # --- coremltools ----------------------------------------------------------------

    @property
    def min_target(self) -> str:
        """The lowest Core ML deployment target that can hold this recipe's ops."""
        specs = [(self.nbits, self.granularity, self.cluster_dim)]
        specs += [(v.nbits, v.granularity, 1) for _, v in self.overrides if v is not None]
        needs18 = any(n == 3 or g == "per_grouped_channel" or cd > 1 for n, g, cd in specs)
        return "iOS18" if needs18 else "iOS16"

    def op_config(self, spec: LayerSpec | None = None):
        from coremltools.optimize.coreml import OpPalettizerConfig

        nbits, gran, group = (self.nbits, self.granularity, self.group_size) if spec is None else (
            spec.nbits, spec.granularity, spec.group_size)
        kw = dict(group_size=group) if gran == "per_grouped_channel" else {}
        return OpPalettizerConfig(
            mode=self.mode,
            nbits=nbits,
            granularity=gran,
            cluster_dim=self.cluster_dim if spec is None else 1,
            weight_threshold=self.weight_threshold,
            num_kmeans_workers=1,  # several workers hang here (see REFERENCE.md)
            **kw,
        )

    def to_coreml_config(self, keep_dense: tuple[str, ...] = ()):
        """`OptimizationConfig` for `ct.optimize.coreml.palettize_weights` (overrides as op-name
        configs; the consts in `keep_dense` get None, i.e. stay fp16)."""
        from coremltools.optimize.coreml import OptimizationConfig

        by_name = {k: None for k in keep_dense}
        by_name.update({k: (None if v is None else self.op_config(v)) for k, v in self.overrides})
        return OptimizationConfig(global_config=self.op_config(), op_name_configs=by_name)

    def to_torch_config(self, skip_modules: tuple[str, ...] = ()):
        """`PostTrainingPalettizerConfig` for the torch engine; `skip_modules` stay dense
        (the torch side has no weight_threshold, so the caller lists the small modules)."""
        from coremltools.optimize.torch.palettization import PostTrainingPalettizerConfig

        cfg = dict(n_bits=self.nbits, granularity=self.granularity, cluster_dim=self.cluster_dim)
        if self.granularity == "per_grouped_channel":
            cfg["group_size"] = self.group_size
        # fast k-means mode rounds weights before clustering: off, so both engines see the same fp16 weights
        cfg["enable_fast_kmeans_mode"] = False
        return PostTrainingPalettizerConfig.from_dict(
            {"global_config": cfg, "module_name_configs": {m: None for m in skip_modules}}
        )


_SHORT = {"text_encoder": "te", "unet": "unet", "vae_decoder": "vaed", "vae_encoder": "vaee"}


def implied_granularity(granularity: str | None, group_size) -> str:
    """The one rule: a group size means grouped LUTs, none means one LUT per tensor."""
    if granularity is None:
        return "per_tensor" if group_size is None else "per_grouped_channel"
    return granularity


def _check_engine(r: "Recipe") -> None:
    """What each engine can run, refused when the recipe is built (not after minutes of work)."""
    if r.engine == "torch" and r.mode != "kmeans":
        raise ConfigError("engine='torch' (PostTrainingPalettizer) only does k-means; use engine='coremltools' "
                          "for mode='uniform'")
    if r.engine == "sdwork" and r.cluster_dim > 1:
        raise ConfigError(f"engine='sdwork' does not do vector palettization (cluster_dim={r.cluster_dim}); use "
                          "engine='coremltools' or 'torch' for cluster_dim > 1")


def check_lut(nbits, granularity, group_size, cluster_dim, what: str):
    """The LUT fields of a recipe, an override or DKM settings, checked together (what names the owner)."""
    if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits not in NBITS:
        raise ConfigError(f"{what}: nbits={nbits!r} is not supported by Core ML palettization; use one of "
                          f"{', '.join(map(str, NBITS))} (a whole number)")
    validate.choice(f"{what}: granularity", granularity, GRANULARITIES)
    validate.integer(f"{what}: cluster_dim", cluster_dim, lo=1)
    if granularity == "per_tensor":
        if group_size is not None:
            raise ConfigError(
                f"{what}: group_size={group_size} only applies to granularity='per_grouped_channel'; "
                "drop group_size or switch granularity"
            )
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ConfigError(
            f"{what}: per_grouped_channel needs group_size, a positive number of output channels per LUT; got {group_size!r}"
        )
    if group_size % cluster_dim:
        raise ConfigError(
            f"{what}: cluster_dim={cluster_dim} must divide group_size={group_size} "
            "(each LUT entry is a vector along the grouped channels); pick a cluster_dim that divides it"
        )


def _normalise_overrides(overrides) -> tuple:
    items = overrides.items() if isinstance(overrides, dict) else overrides
    out = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"override keys are Core ML const op names (strings), got {name!r}")
        if isinstance(spec, dict):
            spec = LayerSpec(**spec)
        elif isinstance(spec, (list, tuple)):
            spec = LayerSpec(*spec)
        elif spec is not None and not isinstance(spec, LayerSpec):
            raise ConfigError(f"override for {name!r} must be None, (nbits, granularity, group_size) or a dict, got {spec!r}")
        out[name] = spec
    return tuple(sorted(out.items()))


def grid(
    nbits=(2, 3, 4, 6, 8),
    group_sizes=(None, 4, 16, 64),
    **common,
) -> list[Recipe]:
    """The cartesian product of bit widths and granularities; group size None means per-tensor."""
    return [Recipe(nbits=n, group_size=g, **common) for n in nbits for g in group_sizes]

"""A compression recipe: what to compress, how, and with which engine.

A Recipe is validated when built, so an impossible request fails before any
work starts, with a message naming the fix. It round-trips through JSON, has a
short stable `name` (the row key of a sweep), and turns into the coremltools
configs of each compression stage (sdwork.compress.families):

    Recipe(nbits=4, group_size=16)                  km4-g16          palettize
    Recipe(linear_bits=8)                           int8-pc          linear, per output channel
    Recipe(linear_bits=4, block_size=32)            int4-b32         linear, per block of 32 inputs
    Recipe(sparsity=0.5) / Recipe(n_m=(2, 4))       sp50 / nm2-4     prune
    Recipe(sparsity=0.5, nbits=4, group_size=16)    sp50-km4-g16     joint: pruned, then palettized
    Recipe(nbits=4, group_size=16, lut_dtype="int8") km4-g16-lut8    joint: palettized, LUT in int8

The palettization fields came first; a recipe of palettization alone keeps the name and
`to_dict` it always had (the new fields appear only when set), so earlier rows keep their keys.

Defaults follow coremltools and Apple's ml-stable-diffusion: k-means, per-tensor,
weight_threshold 2048, and the text encoder plus the UNet compressed (what
`--quantize-nbits` does); the VAE decoder stays fp16 unless asked for, because
it is small and works in pixel space where errors show directly. The engine
defaults to "coremltools" (the reference implementation); the grids in
data/grids/ choose the faster "sdwork" drop-in, which takes the same configs.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from sdwork import validate
from sdwork.compress import families as F
from sdwork.convert.components import COMPONENTS
from sdwork.errors import ConfigError

NBITS = (1, 2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
MODES = ("kmeans", "uniform")
ENGINES = ("coremltools", "torch", "sdwork")
DEFAULT_COMPONENTS = ("text_encoder", "unet")
DEFAULT_WEIGHT_THRESHOLD = 2048  # coremltools' default: weights with more elements get compressed
# the fields beyond palettization, with their defaults: left out of to_dict() at these values
FAMILY_DEFAULTS = dict(lut_dtype="fp16", linear_bits=None, linear_granularity=None, block_size=None,
                       linear_mode="linear_symmetric", sparsity=None, n_m=None)


@dataclass(frozen=True)
class LayerSpec:
    """A per-layer override: the whole compression of one weight, replacing the recipe's
    (another bit width / granularity, another family, or several chained). Fields as Recipe's."""

    nbits: int | None = None
    granularity: str | None = None  # None: per_grouped_channel when group_size is given, else per_tensor
    group_size: int | None = None
    lut_dtype: str = "fp16"
    linear_bits: int | None = None
    linear_granularity: str | None = None
    block_size: int | None = None
    linear_mode: str = "linear_symmetric"
    sparsity: float | None = None
    n_m: tuple[int, int] | None = None

    def __post_init__(self):
        _check_families(self, "override", cluster_dim=1, mode="kmeans")

    def to_dict(self) -> dict:
        d = dict(nbits=self.nbits, granularity=self.granularity, group_size=self.group_size)
        return {**d, **_family_extras(self)}


@dataclass(frozen=True)
class Recipe:
    nbits: int | None = None  # palettization bits; None: no palettization
    granularity: str | None = None  # None: per_grouped_channel when group_size is given, else per_tensor
    group_size: int | None = None  # output channels sharing one LUT; LUTs per layer = C_out / group_size
    cluster_dim: int = 1  # >1: vector palettization, each LUT entry is a cluster_dim-long vector
    mode: str = "kmeans"
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    engine: str = "coremltools"
    # op (const) name -> LayerSpec, or None to leave that weight in fp16; sorted pairs keep it hashable
    overrides: tuple[tuple[str, LayerSpec | None], ...] = field(default=())
    # --- beyond palettization (sdwork.compress.families) ---
    lut_dtype: str = "fp16"  # "int8": the LUTs stored as int8 (joint: palettize, then quantize the LUT)
    linear_bits: int | None = None  # linear quantization to int8 / int4; None: none
    linear_granularity: str | None = None  # None: per_block when block_size is given, else per_channel
    block_size: int | None = None  # per_block: input channels sharing one scale
    linear_mode: str = "linear_symmetric"  # or "linear" (with zero points)
    sparsity: float | None = None  # magnitude pruning: the fraction of weights set to zero
    n_m: tuple[int, int] | None = None  # n:m pruning: n of every m consecutive input weights zeroed

    def __post_init__(self):
        _check_families(self, "recipe", self.cluster_dim, self.mode)
        validate.integer("weight_threshold", self.weight_threshold, lo=0)
        comps = (self.components,) if isinstance(self.components, str) else self.components
        comps = validate.sequence("components", comps, lambda w, c: validate.choice(w, c, COMPONENTS),
                                  "['text_encoder', 'unet']")
        object.__setattr__(self, "components", tuple(sorted(set(comps), key=COMPONENTS.index)))
        validate.choice("engine", self.engine, ENGINES)
        object.__setattr__(self, "overrides", _normalise_overrides(self.overrides))
        _check_engine(self)
        if "palettize" not in self.stages:
            # the engine only chooses the k-means: without palettization every engine would run
            # the same coremltools passes, so one name (and one row) covers them
            object.__setattr__(self, "engine", "coremltools")
        if self.overrides and self.engine == "torch":
            raise ConfigError("per-layer overrides are keyed by Core ML op names; use engine 'coremltools' or 'sdwork'")

    # --- identity -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Short stable id, e.g. 'km4-pt', 'km4-g16', 'un2-g4-cd2-wt4096-all-torch', 'int4-b32',
        'sp50-km4-g16' (stages in the order they are applied)."""
        parts = _stage_parts(self)
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
    def lut_entries(self) -> int | None:
        return None if self.nbits is None else 2**self.nbits

    # --- families -------------------------------------------------------------------

    def plans(self) -> list:
        """This recipe's plan and every override's (None overrides, kept fp16, left out)."""
        return [self] + [v for _, v in self.overrides if v is not None]

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage some weight goes through, in the order applied (families.STAGES)."""
        used = {s for p in self.plans() for s in F.plan_stages(p)}
        return tuple(s for s in F.STAGES if s in used)

    @property
    def family(self) -> str:
        """'palettize', 'linear', 'prune', 'joint' (stages chained on one weight) or 'mixed'
        (different families on different layers): a results row's `family` column."""
        return F.family([F.plan_stages(p) for p in self.plans()])

    @property
    def palettize_only(self) -> bool:
        """Palettization with fp16 LUTs and nothing else: the engines of sdwork.compress.palettize_fast."""
        return self.stages == ("palettize",)

    def for_layer(self, name: str) -> "Recipe | None":
        """The recipe one weight gets: its override's fields in place of the recipe's, None to keep it
        fp16 (a LayerSpec is a whole plan: stages it does not name are not applied to that weight)."""
        return _layer_recipe(self, name)

    def stage_configs(self) -> dict:
        """{stage: coremltools op config} of this recipe's own plan (overrides: `for_layer`)."""
        make = dict(prune=lambda: F.prune_config(self, self.weight_threshold), palettize=self.op_config,
                    linear=lambda: F.linear_config(self, self.weight_threshold),
                    lut=lambda: F.lut_config(self, self.weight_threshold))
        return {s: make[s]() for s in F.plan_stages(self)}

    # --- serialisation --------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in FAMILY_DEFAULTS}
        d["components"] = list(self.components)
        d["overrides"] = {k: (None if v is None else v.to_dict()) for k, v in self.overrides}
        return {**d, **_family_extras(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(**validate.known_keys("recipe", d, [f.name for f in fields(cls)]))

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    # --- coremltools ----------------------------------------------------------------

    @property
    def min_target(self) -> str:
        """The lowest Core ML deployment target that can hold this recipe's ops."""
        return F.lowest_target(self.requirements())

    def requirements(self) -> list[tuple[str, str]]:
        """[(what, lowest target)] for every part of the recipe, overrides included."""
        return sorted({r for p in self.plans() for r in F.requirements(p)})

    def check_target(self, target: str) -> None:
        """ConfigError naming the ops `target` (e.g. 'iOS17') lacks for this recipe."""
        F.check_target(self.name, self.requirements(), target)

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
    if r.engine == "torch" and not r.palettize_only:
        raise ConfigError(f"engine='torch' (PostTrainingPalettizer) only palettizes with fp16 LUTs; recipe stages "
                          f"{'+'.join(r.stages)} run on the Core ML side: use engine='coremltools' or 'sdwork'")
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


def _check_families(r, what: str, cluster_dim: int, mode: str) -> None:
    """The family fields of a Recipe or LayerSpec: each family's own checks, then how they combine."""
    if r.nbits is None:
        _refuse_set(r, what, ("granularity", "group_size"), "a palettization setting, which needs nbits (one of "
                    f"{', '.join(map(str, NBITS))})")
        if cluster_dim != 1 or mode != "kmeans" or r.lut_dtype != "fp16":
            raise ConfigError(f"{what}: cluster_dim, mode and lut_dtype are palettization settings, which need nbits "
                              f"(one of {', '.join(map(str, NBITS))})")
    else:
        object.__setattr__(r, "granularity", implied_granularity(r.granularity, r.group_size))
        check_lut(r.nbits, r.granularity, r.group_size, cluster_dim, what=what)
        validate.choice(f"{what}: mode", mode, MODES)
        if cluster_dim > 1 and mode != "kmeans":
            raise ConfigError(f"cluster_dim={cluster_dim} (vector palettization) needs mode='kmeans'")
        validate.choice(f"{what}: lut_dtype", r.lut_dtype, F.LUT_DTYPES)
        if r.lut_dtype != "fp16" and r.granularity == "per_tensor" and 2**r.nbits < 10:
            raise ConfigError(f"{what}: lut_dtype={r.lut_dtype!r} with one {2**r.nbits}-entry LUT per tensor: "
                              "coremltools writes a LUT under 10 entries inline and never quantizes it; use "
                              "nbits >= 4, grouped LUTs (group_size), or lut_dtype='fp16'")
    if r.linear_bits is None:
        _refuse_set(r, what, ("linear_granularity", "block_size"), "a linear quantization setting, which needs "
                    "linear_bits (8 or 4)")
        if r.linear_mode != "linear_symmetric":
            raise ConfigError(f"{what}: linear_mode is a linear quantization setting, which needs linear_bits (8 or 4)")
    else:
        object.__setattr__(r, "linear_granularity", F.implied_linear_granularity(r.linear_granularity, r.block_size))
        F.check_linear(r.linear_bits, r.linear_granularity, r.block_size, r.linear_mode, what)
    object.__setattr__(r, "n_m", F.check_prune(r.sparsity, r.n_m, what))
    if r.sparsity is not None:
        object.__setattr__(r, "sparsity", float(r.sparsity))
    if r.nbits is not None and r.linear_bits is not None:
        raise ConfigError(f"{what}: nbits={r.nbits} and linear_bits={r.linear_bits} both compress the weights, and "
                          "Core ML cannot chain a palettized weight into linear quantization; pick one (for an int8 "
                          "LUT use lut_dtype='int8'; for different families per layer use overrides)")
    if not F.plan_stages(r):
        keep = " (or None to keep the layer fp16)" if what == "override" else ""
        raise ConfigError(f"{what}: needs a compression: nbits (palettization), linear_bits (linear quantization), "
                          f"sparsity or n_m (pruning){keep}")


def _refuse_set(r, what: str, names, why: str) -> None:
    for n in names:
        if getattr(r, n) is not None:
            raise ConfigError(f"{what}: {n}={getattr(r, n)!r} is {why}")


def _family_extras(r) -> dict:
    """The fields beyond palettization that differ from their defaults (n_m as JSON has it)."""
    out = {k: getattr(r, k) for k, v in FAMILY_DEFAULTS.items() if getattr(r, k) != v}
    if "n_m" in out:
        out["n_m"] = list(out["n_m"])
    return out


def _stage_parts(r: "Recipe") -> list[str]:
    """The name's first parts, one group per stage in the order they run."""
    parts = []
    if r.sparsity is not None:
        parts.append("sp" + F.sparsity_label(r.sparsity))
    if r.n_m is not None:
        parts.append(f"nm{r.n_m[0]}-{r.n_m[1]}")
    if r.nbits is not None:  # the palettization name as it always was
        parts.append(("km" if r.mode == "kmeans" else "un") + str(r.nbits))
        parts.append("pt" if r.granularity == "per_tensor" else f"g{r.group_size}")
        if r.cluster_dim != 1:
            parts.append(f"cd{r.cluster_dim}")
        if r.lut_dtype != "fp16":
            parts.append("lut" + r.lut_dtype.removeprefix("int"))
    if r.linear_bits is not None:
        parts.append(f"int{r.linear_bits}")
        parts.append({"per_channel": "pc", "per_tensor": "pt"}.get(r.linear_granularity, f"b{r.block_size}"))
        if r.linear_mode == "linear":
            parts.append("zp")  # zero points stored beside the scales
    return parts


@functools.lru_cache(maxsize=4096)
def _layer_recipe(r: "Recipe", name: str) -> "Recipe | None":
    overrides = dict(r.overrides)
    if name not in overrides:
        return replace(r, overrides=())
    spec = overrides[name]
    if spec is None:
        return None
    plan = {f.name: getattr(spec, f.name) for f in fields(LayerSpec)}
    if spec.nbits is None:
        plan["mode"] = "kmeans"  # the recipe's palettization mode means nothing to this layer
    return replace(r, overrides=(), cluster_dim=1, **plan)


def _normalise_overrides(overrides) -> tuple:
    items = overrides.items() if isinstance(overrides, dict) else overrides
    out = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"override keys are Core ML const op names (strings), got {name!r}")
        if isinstance(spec, dict):
            spec = validate.build(LayerSpec, spec, f"override for {name!r}")
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

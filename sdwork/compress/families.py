"""The compression families a Recipe can ask for, the checks on their fields, and the
coremltools op config each becomes.

A recipe (or one layer's override) is a plan of up to four stages, always applied in this
order, because that is the order coremltools can chain them in (iOS18 joint compression):

    prune      magnitude pruning, unstructured (`sparsity`) or n:m (`n_m`)
    palettize  a LUT per tensor / per group of output channels (`nbits`, `group_size`, ...)
    linear     int8 / int4 linear quantization, per channel or per block (`linear_bits`, `block_size`)
    lut        the palettization's LUT itself stored as int8 (`lut_dtype="int8"`)

palettize and linear never both apply to one weight: coremltools quantizes a LUT, not an
already palettized weight (that is the lut stage). A recipe's family names what its rows
compare: one stage kind is that kind, a stage chained on another is "joint", different kinds
on different layers (through overrides) is "mixed".
"""
from __future__ import annotations

from sdwork import validate
from sdwork.errors import ConfigError

STAGES = ("prune", "palettize", "linear", "lut")
FAMILIES = ("palettize", "linear", "prune", "joint", "mixed")
LINEAR_BITS = (4, 8)
LINEAR_GRANULARITIES = ("per_tensor", "per_channel", "per_block")
LINEAR_MODES = ("linear_symmetric", "linear")  # coremltools' names: symmetric, or with a zero point
LUT_DTYPES = ("fp16", "int8")
# Core ML deployment targets and their specificationVersion
TARGETS = {"iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9}


# --- field checks (shared by Recipe and LayerSpec) -------------------------------------


def implied_linear_granularity(granularity: str | None, block_size) -> str:
    """Like palettization's rule: a block size means per-block scales, none means per channel."""
    if granularity is None:
        return "per_channel" if block_size is None else "per_block"
    return granularity


def check_linear(bits, granularity, block_size, mode, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LINEAR_BITS:
        raise ConfigError(f"{what}: linear_bits={bits!r} is not supported by Core ML linear quantization; use 8 or 4")
    validate.choice(f"{what}: linear_granularity", granularity, LINEAR_GRANULARITIES)
    validate.choice(f"{what}: linear_mode", mode, LINEAR_MODES)
    if granularity != "per_block":
        if block_size is not None:
            raise ConfigError(f"{what}: block_size={block_size} only applies to linear_granularity='per_block'; "
                              "drop block_size or switch granularity")
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"{what}: per_block quantization needs block_size, a whole number >= 2 of input "
                          f"channels sharing one scale (e.g. 32); got {block_size!r}")


def check_prune(sparsity, n_m, what: str) -> tuple | None:
    """Validates the pruning fields; returns n_m as a tuple (a YAML or JSON list becomes one)."""
    if sparsity is not None and n_m is not None:
        raise ConfigError(f"{what}: give sparsity (unstructured) or n_m (structured), not both")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ConfigError(f"{what}: sparsity must be a fraction strictly between 0 and 1 (the share of "
                              f"weights set to zero, e.g. 0.5), got {sparsity!r}")
    if n_m is None:
        return None
    if isinstance(n_m, str) or not isinstance(n_m, (list, tuple)) or len(n_m) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in n_m):
        raise ConfigError(f"{what}: n_m must be two whole numbers [n, m] (n of every m consecutive input weights "
                          f"set to zero, e.g. [2, 4]), got {n_m!r}")
    n, m = n_m
    if not 0 < n < m:
        raise ConfigError(f"{what}: n_m=[{n}, {m}] needs 0 < n < m (n of every m weights are zeroed; "
                          "n = m would zero them all)")
    return (n, m)


def sparsity_label(sparsity: float) -> str:
    """50 for 0.5, 87.5 for 0.875: the percentage as it goes into a recipe name."""
    return format(sparsity * 100, ".10g")


# --- what a plan needs ----------------------------------------------------------------


def plan_stages(p) -> tuple[str, ...]:
    """The stages of one plan (a Recipe or LayerSpec: anything with the family fields), in order."""
    have = dict(prune=p.sparsity is not None or p.n_m is not None, palettize=p.nbits is not None,
                linear=p.linear_bits is not None, lut=p.nbits is not None and p.lut_dtype != "fp16")
    return tuple(s for s in STAGES if have[s])


def family(plans: list[tuple[str, ...]]) -> str:
    """The family of a recipe from the stages of each of its plans (global and overrides)."""
    plans = [p for p in plans if p]
    if any(len(p) > 1 for p in plans):
        return "joint"
    kinds = {p[0] for p in plans}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def requirements(p) -> list[tuple[str, str]]:
    """[(what, lowest target)] of one plan: which Core ML op each part needs (per coremltools 9.0)."""
    out = []
    if p.nbits is not None:
        ios18 = p.nbits == 3 or p.granularity == "per_grouped_channel" or getattr(p, "cluster_dim", 1) > 1
        out.append(("palettization" + (" (3-bit, grouped or vector)" if ios18 else ""), "iOS18" if ios18 else "iOS16"))
    if p.linear_bits is not None:
        ios18 = p.linear_bits == 4 or p.linear_granularity == "per_block"
        out.append((f"int{p.linear_bits} {p.linear_granularity} linear quantization",
                    "iOS18" if ios18 else "iOS16"))
    if p.sparsity is not None or p.n_m is not None:
        out.append(("pruning (constexpr_sparse_to_dense)", "iOS16"))
    if p.nbits is not None and p.lut_dtype != "fp16":
        out.append((f"{p.lut_dtype} LUTs", "iOS18"))
    if len(plan_stages(p)) > 1:
        out.append(("joint compression (" + "+".join(plan_stages(p)) + ")", "iOS18"))
    return out


def lowest_target(reqs: list[tuple[str, str]]) -> str:
    return max((t for _, t in reqs), key=TARGETS.__getitem__, default="iOS16")


def check_target(name: str, reqs: list[tuple[str, str]], target: str) -> None:
    """Refuse a target (e.g. the one a package was converted for) that lacks an op the recipe needs."""
    validate.choice("target", target, tuple(TARGETS))
    missing = [(w, t) for w, t in reqs if TARGETS[t] > TARGETS[target]]
    if missing:
        need = lowest_target(missing)
        raise ConfigError(f"recipe {name} needs deployment target {need} for "
                          f"{', '.join(w for w, _ in missing)}; {target} lacks those ops. Re-convert with "
                          f"target='{need}'")


# --- coremltools op configs -----------------------------------------------------------


def prune_config(p, weight_threshold: int):
    from coremltools.optimize.coreml import OpMagnitudePrunerConfig

    if p.n_m is not None:  # n of every m along the input axis (coremltools' default dim=1)
        return OpMagnitudePrunerConfig(n_m_ratio=tuple(p.n_m), weight_threshold=weight_threshold)
    return OpMagnitudePrunerConfig(target_sparsity=float(p.sparsity), weight_threshold=weight_threshold)


def linear_config(p, weight_threshold: int):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    kw = dict(block_size=p.block_size) if p.linear_granularity == "per_block" else {}
    return OpLinearQuantizerConfig(mode=p.linear_mode, dtype=f"int{p.linear_bits}", granularity=p.linear_granularity,
                                   weight_threshold=weight_threshold, **kw)


def lut_config(p, weight_threshold: int):
    """coremltools quantizes a LUT only per tensor (one scale for all the layer's LUTs)."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=p.lut_dtype, granularity="per_tensor",
                                   weight_threshold=weight_threshold)


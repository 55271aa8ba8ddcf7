"""The knapsack allocator: exact optimum of the additive model, budgets kept to the byte, the
interaction correction on a synthetic drift with known pairwise terms, then a real comparison
on the tiny-random UNet through Experiment.run (sizes checked on the written packages)."""
import itertools
import math

import numpy as np
import pytest

from sdwork.errors import ConfigError
from sdwork.experiments import allocate as A
from sdwork.experiments import mixedbit as mb
from sdwork.experiments.sensitivity import FP16

CANDS = ("2-pt", "3-pt", "4-pt", "6-pt", "8-pt")


def random_options(rng, n_layers=5, zero_drift_8bit=False) -> dict[str, list[mb.Option]]:
    """Layers of 64-byte blobs (as weight.bin stores them) whose drift falls with bits, not smoothly."""
    out = {}
    for i in range(n_layers):
        lines = int(rng.integers(4, 60))  # fp16 size in 64-byte lines
        drift = np.sort(rng.random(len(CANDS)))[::-1] * rng.random() * 10
        if zero_drift_8bit:
            drift[-1] = 0.0  # the probe saw no difference at 8 bits
        opts = [mb.Option(c, 64 * (1 + lines * int(c[0]) // 16), float(d)) for c, d in zip(CANDS, drift)]
        out[f"down_blocks.{i % 2}.l{i}"] = sorted(opts + [mb.Option(FP16, 64 * (1 + lines), 0.0)],
                                                  key=lambda o: (o.bytes, o.drift))
    return out


def brute_force(options, budget) -> float:
    best = math.inf
    for combo in itertools.product(*options.values()):
        if sum(o.bytes for o in combo) <= budget:
            best = min(best, sum(o.drift for o in combo))
    return best


# --- the knapsack ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_the_exact_optimum_and_fits(seed):
    rng = np.random.default_rng(seed)
    options = random_options(rng)
    lo, hi = A.smallest_bytes(options), A.largest_bytes(options)
    for budget in rng.integers(lo, hi, 4):
        alloc = A.knapsack(options, int(budget))
        assert alloc.bytes <= budget
        assert alloc.predicted_drift == pytest.approx(brute_force(options, int(budget)), rel=1e-12, abs=1e-12)
        assert alloc.predicted_drift <= mb.greedy(options, budget_bytes=int(budget)).predicted_drift + 1e-12


def test_a_budget_for_everything_gives_fp16_everywhere():
    """8-bit measured without drift still loses to fp16 when both fit: nothing is compressed for nothing."""
    options = random_options(np.random.default_rng(0), zero_drift_8bit=True)
    alloc = A.knapsack(options, A.largest_bytes(options))
    assert set(alloc.choice.values()) == {FP16} and alloc.bytes == A.largest_bytes(options)
    one_less = A.knapsack(options, A.largest_bytes(options) - 64)
    assert list(one_less.choice.values()).count(FP16) == len(options) - 1


def test_a_larger_budget_never_predicts_more_drift():
    options = random_options(np.random.default_rng(3), n_layers=40)
    budgets = np.linspace(A.smallest_bytes(options), A.largest_bytes(options), 60).astype(int)
    drifts = [A.knapsack(options, int(b)).predicted_drift for b in budgets]
    assert all(b <= a + 1e-12 for a, b in zip(drifts, drifts[1:]))
    assert drifts[0] > drifts[-1] == 0.0


def test_budgets_outside_the_candidates_are_refused_with_the_limits():
    options = random_options(np.random.default_rng(1))
    sizes = mb.SizeModel(fixed_bytes=1000, total_weights=10**6)
    with pytest.raises(ConfigError, match=f"below the smallest possible package \\({1000 + A.smallest_bytes(options)}"):
        A.check_budget(options, A.smallest_bytes(options) - 1, sizes)
    with pytest.raises(ConfigError, match=f"above the fp16 package \\({1000 + A.largest_bytes(options)} bytes"):
        A.check_budget(options, A.largest_bytes(options) + 1, sizes)
    with pytest.raises(ConfigError, match="below the smallest"):
        A.knapsack(options, 0)


def test_units_are_exact_64_byte_lines_up_to_16_mb_of_fp16():
    one = lambda n: {"w": [mb.Option(FP16, n, 0.0)]}
    assert A.resolution(one(16_000_000)) == 64  # the embedded UNet: 11.6 MB
    assert A.resolution(one(16_000_064)) == 128


def test_coarse_units_still_fit_the_budget():
    options = random_options(np.random.default_rng(2), n_layers=8)
    budget = (A.smallest_bytes(options) + A.largest_bytes(options)) // 2
    exact = A.knapsack(options, budget)
    coarse = A.knapsack(options, budget, unit=64 * 7)
    assert coarse.bytes <= budget and coarse.predicted_drift >= exact.predicted_drift - 1e-12


# --- the interaction correction ----------------------------------------------------------------


def pairwise_drift(options, pair: dict[frozenset, float]):
    """A drift with known interaction: single-layer terms plus pair[{a, b}] * sqrt(d_a d_b)."""
    def measure(chosen: dict[str, str]) -> float:
        d = {l: next(o.drift for o in options[l] if o.candidate == c) for l, c in chosen.items()}
        cross = sum(k * math.sqrt(d[a] * d[b]) for ab, k in pair.items() if ab <= set(d) for a, b in [tuple(ab)])
        return sum(d.values()) + cross
    return measure


def test_shapley_shares_add_up_to_the_measured_drift():
    options = random_options(np.random.default_rng(4), n_layers=6)
    layers = list(options)
    pair = {frozenset(p): k for p, k in [((layers[0], layers[2]), 1.5), ((layers[1], layers[3]), 0.5),
                                         ((layers[0], layers[1]), 0.3)]}
    measure = pairwise_drift(options, pair)
    alloc = A.knapsack(options, (A.smallest_bytes(options) + A.largest_bytes(options)) // 3)
    factors, total, probes = A.shapley_factors(alloc, options, measure, A.block_of)
    chosen = A._compressed(alloc)
    assert total == pytest.approx(measure(chosen))
    share = sum(factors[l] * next(o.drift for o in options[l] if o.candidate == c) for l, c in chosen.items())
    assert share == pytest.approx(total)  # Shapley: exact for pairwise terms (no factor clipped here)
    assert probes == 1 + 2 * len({A.block_of(l) for l in chosen})


def test_refinement_moves_bytes_to_the_layers_that_interact():
    """Two layers that compound each other's drift: the additive knapsack squeezes them, the
    corrected one gives them more bytes and the measured drift falls."""
    rng = np.random.default_rng(5)
    options = random_options(rng, n_layers=6)
    a, b = list(options)[0], list(options)[2]  # one block: down_blocks.0
    measure = pairwise_drift(options, {frozenset((a, b)): 6.0})
    budget = (2 * A.smallest_bytes(options) + A.largest_bytes(options)) // 3
    rounds = A.refine(options, budget, measure, rounds=2, groups=lambda l: l)
    assert all(r.allocation.bytes <= budget for r in rounds)
    assert min(r.measured for r in rounds[1:]) < rounds[0].measured
    assert rounds[0].predicted == pytest.approx(rounds[0].allocation.predicted_drift)  # round 0: additive


def test_block_and_part_groups():
    assert A.block_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "down_blocks.1"
    assert A.block_of("mid_block.resnets.0.conv1") == "mid_block.resnets.0"
    assert A.block_of("conv_in") == A.block_of("conv_in") == "conv_in"
    assert A.block_of("time_embedding.linear_1") == "time_embedding"
    assert A.part_of("down_blocks.1.attentions.0.proj_in") == "down_blocks.1.attentions"
    assert A.part_of("down_blocks.1.resnets.0.conv1") == "down_blocks.1.resnets"


def test_the_pick_is_made_on_seeds_the_experiment_never_scores():
    from sdwork import GenSettings

    settings = GenSettings(prompts=("a red circle", "a blue square"), seeds=(3, 0, 1), steps=7, guidance=4.0)
    probe = A.joint_probe(settings, seeds=2)
    assert probe.seeds == (4, 5) and not set(probe.seeds) & set(settings.seeds)
    assert (probe.prompts, probe.steps, probe.guidance) == (settings.prompts, 7, 4.0)


# --- real measurements on the tiny-random UNet ----------------------------------------------------


def tiny_config(**kw):
    from sdwork.experiments import sensitivity as S

    probe = S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], seeds=(0,), steps=1)
    return S.SensitivityConfig(**{**dict(model="tiny-random", probe=probe, nbits=(2, 8), group_sizes=(None,)), **kw})


@pytest.mark.slow  # loads a pipeline and compiles the exact k-means: about 30 s on a busy machine
def test_adding_a_candidate_measures_only_its_cells(tmp_path):
    from sdwork.experiments import sensitivity as S

    layers = ("conv_in", "down_blocks.0.resnets.0.conv1", "conv_out")
    first = S.Sensitivity(tiny_config(only_layers=layers), tmp_path, progress=False)
    table = first.run()
    assert first.last_run == dict(measured=6, reused=0, seconds=first.last_run["seconds"]) and first.probes == 6
    grown = S.Sensitivity(tiny_config(only_layers=layers, nbits=(2, 3, 8), group_sizes=(None, 16)), tmp_path,
                          pipe=first.pipe, progress=False)
    again = grown.run()
    # 3-bit for every layer, g16 at 2, 3 and 8 bits for the two layers whose channels allow it
    assert grown.last_run["measured"] == 3 + 2 * 3 == grown.probes and grown.last_run["reused"] == 6
    cols = ["layer", "candidate", "latent_mse", "image_mse"]
    kept = again[again["candidate"].isin(["2-pt", "8-pt"])][cols].reset_index(drop=True)
    assert kept.equals(table[cols])
    assert grown.cost()["cells"] == len(again) == 15


# the largest UNet weights, and conv_out: it holds weight.bin's final blob, which is not padded
LAYERS = ("up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv1", "up_blocks.1.resnets.0.conv1",
          "down_blocks.2.resnets.0.conv1", "mid_block.resnets.0.conv1", "conv_out")
BITS = 14.0  # bits per weight of the whole package: the layers not analysed stay fp16


@pytest.mark.slow  # the fp16 packages, a small table, Apple's pass and about 5 variants through Experiment.run
def test_compare_keeps_budgets_to_the_byte_and_picks_on_held_out_seeds(tmp_path):
    from sdwork import Experiment, GenSettings
    from sdwork.experiments.results import rows

    exp = Experiment("tiny-random", GenSettings(prompts=("a small green circle on a black background",), seeds=(0,),
                                                steps=1), scorer=None, out=tmp_path / "exp", progress=False)
    c = A.compare(exp, tiny_config(only_layers=LAYERS), bits=(1.0, BITS, 17.0), top_k=2,
                  greedy_objectives=("image_mse",), progress=False)
    s = c.summary.set_index(["target_bits", "method"])
    assert "below the smallest possible package" in s.loc[(1.0, "knapsack"), "error"]
    assert "above the fp16 package" in s.loc[(17.0, "knapsack"), "error"]
    at3 = c.summary[c.summary["target_bits"] == BITS]
    assert set(at3["method"]) == {"greedy/image", "apple", "knapsack"}, at3.to_dict("records")
    budget = c.proposals["target_bytes"].iloc[0]
    assert (at3["bytes"] == at3["predicted_bytes"]).all()  # predicted from the LUT formulas, read from the package
    assert (at3["bytes"] <= budget).all() and (c.proposals["predicted_bytes"] <= budget).all()
    # the pick is the proposal of least drift on the joint probe's seeds, the greedy's recipe among them
    offered = c.proposals[c.proposals["target_bits"] == BITS]
    assert any(p.startswith("greedy") for p in offered["proposal"]) or len(offered) < 2 + 2 * 1
    best = offered.sort_values(["probe_image_mse", "round"], kind="stable").iloc[0]
    final = c.results[c.results["method"] == "knapsack"].iloc[0]
    assert final["picked"] == best["proposal"] == offered.iloc[0]["proposal"]
    assert final["same_as"] and final["probe_image_psnr"] > 0 and final["predicted_drift"] > 0
    # its verdict is read on the experiment's images alone, against both other methods
    kept = at3.set_index("method")
    beats = all(kept.loc["knapsack", m] >= kept.loc[o, m] for o in ("greedy/image", "apple") for m in ("psnr", "ssim"))
    assert bool(kept.loc["knapsack", "wins"]) == beats and c.win_ratio == float(beats)
    assert c.cost["sensitivity"]["cells"] == 2 * len(LAYERS)
    written = len(rows(exp.out))
    again = A.compare(exp, tiny_config(only_layers=LAYERS), bits=(BITS,), top_k=2, greedy_objectives=("image_mse",),
                      progress=False)
    assert len(rows(exp.out)) == written and again.cost["sensitivity"]["measured_now"] == 0
    assert list(again.summary["psnr"]) == list(at3["psnr"])

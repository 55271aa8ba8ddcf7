"""sdwork: shrink Stable Diffusion for Core ML and measure what each compression costs.

The names a notebook needs; the layout, bottom to top, is load -> convert -> compress ->
generate/evaluate -> experiments -> report (a test keeps imports pointing downwards).

    exp = Experiment("tiny", GenSettings(prompts=[...], seeds=[0, 1]), scorer="tiny", out="runs/x")
    v = exp.run(Recipe(nbits=4, group_size=16))
    df = exp.sweep("default")
"""
from sdwork.compress.recipe import LayerSpec, Recipe
from sdwork.convert.export import convert_pipeline
from sdwork.errors import SdworkError
from sdwork.evaluate.metrics import ClipScorer, score_images
from sdwork.evaluate.parity import parity_report
from sdwork.experiments.experiment import Experiment, Variant
from sdwork.experiments.grids import load_grid
from sdwork.experiments.results import load_results, summary_table
from sdwork.generate import GenSettings, fp16_baseline
from sdwork.load import load_pipeline

__all__ = [
    "ClipScorer", "Experiment", "GenSettings", "LayerSpec", "Recipe", "SdworkError", "Variant", "convert_pipeline",
    "fp16_baseline", "load_grid", "load_pipeline", "load_results", "parity_report", "score_images",
    "summary_table",
]

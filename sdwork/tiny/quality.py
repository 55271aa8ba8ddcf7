"""Quality bars of the embedded model, measured on held-out attribute combinations.

- scorer ranking: the CLIP scorer ranks the true caption first among the
  captions that differ from it in one attribute (held-out dataset images);
- prompt following: images generated from held-out prompts show the right
  colour and shape, judged by pixel statistics (sdwork.tiny.judge) and, as a
  second opinion, by the CLIP scorer choosing among colour / shape variants;
- speed: seconds per 64x64 image at the given number of steps.
"""
from __future__ import annotations

import time

import numpy as np

from sdwork.tiny import dataset, judge


def _rank_first(scorer, images: np.ndarray, true: list[str], candidates: list[list[str]]) -> np.ndarray:
    """For each image: is its true caption the best-scoring among candidates (true included)?"""
    hits = []
    for img, t, cands in zip(images, true, candidates):
        texts = [t] + [c for c in cands if c != t]
        scores = scorer.text_image(texts, np.repeat(img[None], len(texts), axis=0))
        hits.append(int(np.argmax(scores)) == 0)
    return np.asarray(hits)


def scorer_ranking(scorer, per_combo: int = 20, seed: int = 7) -> float:
    """Share of held-out dataset images whose true caption ranks first among one-attribute variants."""
    _, held = dataset.split_combinations()
    images, captions = dataset.make_dataset(held, per_combo, seed)
    attrs = [dataset.parse_caption(c) for c in captions]
    cands = [[v.caption for v in dataset.one_attribute_variants(a)] for a in attrs]
    return float(_rank_first(scorer, images, captions, cands).mean())


def _variants(a: dataset.Attrs, name: str) -> list[str]:
    return [dataset.Attrs(**{**a.__dict__, name: v}).caption for v in dataset.ATTRIBUTES[name]]


def prompt_following(pipe, scorer, seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 5.0, progress=True) -> dict:
    """Colour and shape accuracy of images generated from the held-out prompts."""
    from sdwork.generate import GenSettings, generate

    _, held = dataset.split_combinations()
    prompts = tuple(a.caption for a in held)
    settings = GenSettings(prompts=prompts, seeds=tuple(seeds), steps=steps, guidance=guidance)
    t0 = time.perf_counter()
    images = generate(pipe, settings, progress=progress)
    seconds = (time.perf_counter() - t0) / len(images)
    targets = [dataset.parse_caption(p) for p, _ in settings.pairs]
    pixel = judge.accuracy(images, targets)
    captions = [t.caption for t in targets]
    by_clip = {
        name: float(_rank_first(scorer, images, captions, [_variants(t, name) for t in targets]).mean())
        for name in ("colour", "shape")
    }
    return dict(
        n_images=len(images),
        steps=steps,
        guidance=guidance,
        seconds_per_image=seconds,
        pixel_colour=pixel["colour"],
        pixel_shape=pixel["shape"],
        pixel_size=pixel["size"],
        pixel_background=pixel["background"],
        clip_colour=by_clip["colour"],
        clip_shape=by_clip["shape"],
        images=images,
    )


def labelled_round_trips(vae, per_combo: int = 8, seed: int = 99, noise=(0.0, 0.5)) -> tuple[dict, list]:
    """Dataset images of every combination, as drawn ("clean") and through the VAE, with Gaussian
    noise of `noise` x the latents' std added before decoding ("vae+0.5"): images whose attributes are
    known, blurred and damaged the way a decoder damages them, to measure the pixel judge on."""
    import torch

    from sdwork.generate import to_uint8
    from sdwork.tiny.train import to_tensor

    images, captions = dataset.make_dataset(dataset.all_combinations(), per_combo, seed)
    x = to_tensor(images)
    g = torch.Generator().manual_seed(seed)
    sets = {"clean": images}
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        for s in noise:
            z = mean + s * mean.std() * torch.randn(mean.shape, generator=g)
            dec = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, len(z), 256)])
            sets[f"vae+{s}"] = to_uint8((dec / 2 + 0.5).permute(0, 2, 3, 1).numpy())  # as the pipeline outputs
    return sets, [dataset.parse_caption(c) for c in captions]


def shape_confusion(images: np.ndarray, targets: list) -> np.ndarray:
    """Counts [true shape, judged shape] over dataset.SHAPES, plus a last column for "no shape seen"."""
    out = np.zeros((len(dataset.SHAPES), len(dataset.SHAPES) + 1), int)
    for img, t in zip(images, targets):
        j = judge.judge(img)
        out[dataset.SHAPES.index(t.shape), len(dataset.SHAPES) if j is None else dataset.SHAPES.index(j.shape)] += 1
    return out

"""Train the embedded default model from scratch: `python -m sdwork.tiny.train`.

Stages (each seeded, checkpointed under --work and resumable):
  vae   AutoencoderKL on the training images (MSE + tiny KL, as SD's VAE)
  vae_decoder  the decoder fine-tuned on the frozen encoder's latents
  unet  UNet2DConditionModel + CLIPTextModel on cached latents, noise-prediction
        loss with min-SNR weighting, 10% empty captions for classifier-free
        guidance, EMA weights
  clip  CLIPModel scorer: contrastive over the training captions, plus shapes on
        unnamed backgrounds captioned without one (so shape is read from the shape),
        plus a text-only loss tying each caption to its background-free form (so the
        shape word, not the background, steers a caption's embedding)
  save  diffusers StableDiffusionPipeline + CLIPModel under --out (safetensors), and
        training_config.json: the settings the weights were trained with

Each stage's output in --work (checkpoint, final weights, caches) is stamped with the settings
it was made with (<stage>.settings.json, see STAGE_KEYS and CONSUMES); output made with other
settings than the ones asked for is refused (StageMismatchError), never silently reused.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdwork import hooks, paths
from sdwork.errors import MismatchError
from sdwork.tiny import dataset, models, tokenizer

DEFAULT_OUT = paths.MODELS
DEFAULT_WORK = paths.run_dir("runs/tiny-train")

DEFAULTS = dict(
    seed=0,
    per_combo=128,
    vae_steps=1500,
    vae_batch=32,
    vae_lr=1e-3,
    decoder_steps=1500,
    decoder_batch=32,
    decoder_lr=5e-4,
    unet_steps=4000,
    unet_batch=64,
    unet_lr=5e-4,
    uncond_prob=0.1,
    ema_decay=0.999,
    min_snr_gamma=5.0,
    clip_steps=1500,
    clip_batch=128,
    clip_lr=1e-3,
    clip_unnamed_bg_weight=0.5,  # shapes on unnamed backgrounds (see _unnamed_bg_data): held-out ranking 0.83 -> 0.93
    clip_unnamed_bg_per_shape=256,  # 64: 93.3%, 256: 94.2%; 1024: 95.4% but CLIP shape on generated images 75% (see model card)
    clip_text_shape_weight=0.1,  # text-only shape loss (see _text_shape_loss): held-out ranking 94.2 -> 97.9% (seeds 0-2: 97.9 / 97.9 / 90.4)
    ckpt_every=250,
)


# ---------------------------------------------------------------- settings stamps
# The cfg keys each stage's output depends on (not ckpt_every: a resumed run is bit-identical)...
STAGE_KEYS = {
    "train_images": ("seed", "per_combo"),
    "vae": ("seed", "vae_steps", "vae_batch", "vae_lr"),
    "latents": ("seed",),
    "vae_decoder": ("seed", "decoder_steps", "decoder_batch", "decoder_lr"),
    "unet": ("seed", "unet_steps", "unet_batch", "unet_lr", "uncond_prob", "ema_decay", "min_snr_gamma"),
    "clip": ("seed", "clip_steps", "clip_batch", "clip_lr",
             "clip_unnamed_bg_weight", "clip_unnamed_bg_per_shape", "clip_text_shape_weight"),
}
# ...and the output it is made from (latents are the encoder's: the decoder stage does not change them)
CONSUMES = {
    "train_images": (),
    "vae": ("train_images",),
    "latents": ("train_images", "vae"),
    "vae_decoder": ("train_images", "vae", "latents"),
    "unet": ("train_images", "latents"),
    "clip": ("train_images",),
    "save": ("vae", "vae_decoder", "latents", "unet", "clip"),
}
TRAINED = ("vae", "vae_decoder", "unet", "clip")
OUTPUTS = {"train_images": ("train_images.npz",), "latents": ("latents.pt",),
           **{s: (f"{s}.ckpt", f"{s}_final.pt") for s in TRAINED}}


class StageMismatchError(MismatchError):
    """The work folder holds a stage's output made with other settings than the ones asked for."""

    def __init__(self, message: str, stages: dict[str, list[str]]):
        super().__init__(message)
        self.stages = stages  # stage -> its differences, one line each


def _inputs(stage: str) -> set[str]:
    """Every stage whose output `stage` reads, directly or through another."""
    found = set(CONSUMES[stage])
    for s in CONSUMES[stage]:
        found |= _inputs(s)
    return found


def recipe(cfg: dict, stage: str) -> dict:
    """The stamp of `stage` made with cfg: per stage, the settings of it and of all its inputs."""
    names = _inputs(stage) | {stage}
    return {s: {k: cfg[k] for k in keys} for s, keys in STAGE_KEYS.items() if s in names}


def _stamp_path(work: Path, stage: str) -> Path:
    return Path(work) / f"{stage}.settings.json"


def write_stamp(cfg: dict, work: Path, stage: str) -> None:
    path = _stamp_path(work, stage)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe(cfg, stage), indent=2))
    tmp.replace(path)  # atomic: a stamp is whole or absent


def read_stamp(work: Path, stage: str) -> dict | None:
    path = _stamp_path(work, stage)
    return json.loads(path.read_text()) if path.exists() else None


def _existing_outputs(work: Path, stage: str) -> list[Path]:
    return [Path(work) / f for f in OUTPUTS[stage] if (Path(work) / f).exists()]


def _differences(cfg: dict, work: Path, stage: str) -> list[str]:
    """How the settings of stage's existing output differ from cfg's, one line each."""
    if not _existing_outputs(work, stage):
        return []
    old = read_stamp(work, stage)
    if old is None:
        return ["no settings recorded beside its files (made before stamps were kept)"]
    new, lines = recipe(cfg, stage), []
    for s in dict.fromkeys([*old, *new]):
        for k in dict.fromkeys([*old.get(s, {}), *new.get(s, {})]):
            was, now = (d.get(s, {}).get(k, "(none)") for d in (old, new))
            if was != now:
                lines.append(f"{k if s == stage else s + '.' + k} was {was}, now {now}")
    return lines


def check_stages(cfg: dict, work: Path, stages) -> None:
    """Refuse output in `work` made with other settings than cfg, for `stages` and all they read."""
    names = set().union(*(_inputs(s) | {s} for s in stages)) - {"save"}
    found = {s: d for s in STAGE_KEYS if s in names and (d := _differences(cfg, work, s))}
    if found:
        raise StageMismatchError(_mismatch_message(work, found), found)


def _mismatch_message(work: Path, found: dict[str, list[str]]) -> str:
    lines = [f"{work} holds output made with other settings than the ones asked for:"]
    lines += [f"  {s}: {d}" for s, diffs in found.items() for d in diffs]
    files = [p.name for s in found for p in _existing_outputs(work, s) + [_stamp_path(work, s)] if p.exists()]
    lines.append(f"Use a new --work folder, or delete these files to retrain those stages: {', '.join(files)}")
    return "\n".join(lines)


def trained_recipe(work: Path) -> dict:
    """What the finished weights in `work` were trained with, per stage, from their stamps."""
    merged = {}
    for s in TRAINED:
        if not (Path(work) / f"{s}_final.pt").exists():
            raise FileNotFoundError(f"stage {s} has not finished in {work}: run it first (--stages {s})")
        merged.update(read_stamp(work, s))
    return {s: merged[s] for s in STAGE_KEYS if s in merged}


# ---------------------------------------------------------------- utilities
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Checkpoint:
    """A stage's periodic state: the state_dicts of the named objects (models, optimizer), the
    step and, with rng, torch's global RNG; torch.load(weights_only=True) on resume."""

    def __init__(self, path: Path, rng: bool = True, **stateful):
        self.path, self.rng, self.stateful = Path(path), rng, stateful

    def resume(self) -> int:
        """Restore the saved state if there is one; the step to continue from."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        if self.rng:
            torch.set_rng_state(state["rng"])
        return state["step"]

    def save(self, step: int):
        state = {name: obj.state_dict() for name, obj in self.stateful.items()}
        if self.rng:
            state["rng"] = torch.get_rng_state()
        tmp = self.path.with_suffix(".tmp")
        torch.save(dict(state, step=step), tmp)
        tmp.replace(self.path)  # atomic: an interruption never leaves half a checkpoint


def train_data(cfg: dict, work: Path) -> tuple[np.ndarray, list[str]]:
    """The training images, rendered once and cached (reproducible from the seed)."""
    check_stages(cfg, work, ["train_images"])
    cache = work / "train_images.npz"
    if cache.exists():
        z = np.load(cache)
        return z["images"], [str(c) for c in z["captions"]]
    train, _ = dataset.split_combinations()
    images, captions = dataset.make_dataset(train, cfg["per_combo"], seed=cfg["seed"])
    write_stamp(cfg, work, "train_images")
    np.savez(cache, images=images, captions=np.array(captions))
    return images, captions


def get_tokenizer(work: Path):
    folder = work / "tokenizer"
    if not (folder / "vocab.json").exists():
        tokenizer.build_tokenizer_files(dataset.vocabulary_words(), folder)
    return tokenizer.load_tokenizer(folder, models.MAX_LENGTH)


def token_ids(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=models.MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def special_ids(tok) -> tuple[int, int, int]:
    return len(tok), tok.bos_token_id, tok.eos_token_id


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _update(opt, loss: torch.Tensor, clip_params=None) -> float:
    """One optimiser step on loss (gradients clipped to norm 1 over clip_params if given)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    return loss.item()


def _loop(name, steps, start, progress, step_fn, ckpt_fn, every):
    """Steps start..steps-1, saving a checkpoint every `every` steps and after the last."""
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not progress)
    loss_ema = None
    for step in bar:
        loss = step_fn(step)
        loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            ckpt_fn(step + 1)
            hooks.fire("checkpoint_saved", stage=name, step=step + 1)
    return loss_ema


def _checkpoint(cfg: dict, work: Path, stage: str, rng: bool = True, **stateful):
    """The stage's Checkpoint and its save function, which writes the stage's stamp first: a
    checkpoint on disk always has its settings beside it."""
    ck = Checkpoint(work / f"{stage}.ckpt", rng=rng, **stateful)

    def save(step):
        write_stamp(cfg, work, stage)
        ck.save(step)
    return ck, save


def _finish(cfg: dict, work: Path, stage: str, state: dict) -> None:
    write_stamp(cfg, work, stage)
    torch.save(state, work / f"{stage}_final.pt")


# ---------------------------------------------------------------- stage: vae
def train_vae(cfg: dict, work: Path, progress: bool = True):
    check_stages(cfg, work, ["vae"])
    if (work / "vae_final.pt").exists():
        return
    images, _ = train_data(cfg, work)
    torch.manual_seed(cfg["seed"])
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
    ck, save = _checkpoint(cfg, work, "vae", model=vae, opt=opt)
    start = ck.resume()
    order_rng = np.random.default_rng(cfg["seed"] + 1)
    batches = order_rng.integers(0, len(images), size=(cfg["vae_steps"], cfg["vae_batch"]))

    def step_fn(step):
        _set_lr(opt, lr_at(step, cfg["vae_steps"], cfg["vae_lr"]))
        x = to_tensor(images[batches[step]])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        return _update(opt, F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * post.kl().mean())

    _loop("vae", cfg["vae_steps"], start, progress, step_fn, save, cfg["ckpt_every"])
    _finish(cfg, work, "vae", vae.state_dict())


def load_vae(work: Path, decoder: bool = True):
    """The trained VAE; with `decoder`, its decoder fine-tuned on the frozen encoder's latents."""
    vae = models.build_vae()
    vae.load_state_dict(torch.load(work / "vae_final.pt", weights_only=True))
    if decoder:
        missing, unexpected = vae.load_state_dict(torch.load(work / "vae_decoder_final.pt", weights_only=True), strict=False)
        assert not unexpected and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    return vae.eval()


# ---------------------------------------------------------------- stage: vae_decoder
def train_vae_decoder(cfg: dict, work: Path, progress: bool = True):
    """Sharpen the decoder with the encoder frozen (as SD's ft-MSE VAE): latents, and so
    the UNet trained on them, stay valid."""
    check_stages(cfg, work, ["vae_decoder"])
    if (work / "vae_decoder_final.pt").exists():
        return
    images, _ = train_data(cfg, work)
    lat = cache_latents(cfg, work)
    torch.manual_seed(cfg["seed"] + 5)
    vae = load_vae(work, decoder=False).train()
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["decoder_lr"], weight_decay=0.0)
    ck, save = _checkpoint(cfg, work, "vae_decoder", model=vae, opt=opt)
    start = ck.resume()
    order_rng = np.random.default_rng(cfg["seed"] + 5)
    batches = order_rng.integers(0, len(images), size=(cfg["decoder_steps"], cfg["decoder_batch"]))

    def step_fn(step):
        _set_lr(opt, lr_at(step, cfg["decoder_steps"], cfg["decoder_lr"], warmup=50))
        idx = torch.from_numpy(batches[step])
        z = lat["mean"][idx] + lat["std"][idx] * torch.randn(len(idx), 4, 8, 8)
        x = to_tensor(images[batches[step]])
        recon = vae.decode(z).sample
        return _update(opt, F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x))

    _loop("vae_decoder", cfg["decoder_steps"], start, progress, step_fn, save, cfg["ckpt_every"])
    dec = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    _finish(cfg, work, "vae_decoder", dec)


@torch.no_grad()
def cache_latents(cfg: dict, work: Path) -> dict:
    """Posterior mean and std of every training image, plus SD's scaling factor."""
    check_stages(cfg, work, ["latents"])
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    images, _ = train_data(cfg, work)
    vae = load_vae(work, decoder=False)
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(to_tensor(images[i : i + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    g = torch.Generator().manual_seed(cfg["seed"])
    sample = mean + std * torch.randn(mean.shape, generator=g)
    out = dict(mean=mean, std=std, scaling_factor=float(1.0 / sample.std()))
    write_stamp(cfg, work, "latents")
    torch.save(out, path)
    return out


# ---------------------------------------------------------------- stage: unet
def _snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


def train_unet(cfg: dict, work: Path, progress: bool = True):
    check_stages(cfg, work, ["unet"])
    if (work / "unet_final.pt").exists():
        return
    from diffusers import DDPMScheduler

    _, captions = train_data(cfg, work)
    lat = cache_latents(cfg, work)
    tok = get_tokenizer(work)
    ids = token_ids(tok, captions)
    empty = token_ids(tok, [""])[0]
    torch.manual_seed(cfg["seed"])
    unet = models.build_unet()
    text = models.build_text_encoder(*special_ids(tok))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["unet_lr"], weight_decay=1e-2)
    ck, save = _checkpoint(cfg, work, "unet", unet=unet, text=text, ema_unet=ema_unet, ema_text=ema_text, opt=opt)
    start = ck.resume()
    sched = DDPMScheduler(**models.SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod
    order_rng = np.random.default_rng(cfg["seed"] + 2)
    batches = order_rng.integers(0, len(captions), size=(cfg["unet_steps"], cfg["unet_batch"]))
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))

    def step_fn(step):
        _set_lr(opt, lr_at(step, cfg["unet_steps"], cfg["unet_lr"]))
        idx = torch.from_numpy(batches[step])
        b = len(idx)
        z = (lat["mean"][idx] + lat["std"][idx] * torch.randn(b, 4, 8, 8)) * lat["scaling_factor"]
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,))
        noisy = sched.add_noise(z, noise, t)
        tokens = ids[idx].clone()
        tokens[torch.rand(b) < cfg["uncond_prob"]] = empty
        pred = unet(noisy, t, text(tokens)[0]).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        _update(opt, (per * _snr_weights(acp, t, cfg["min_snr_gamma"])).mean(), clip_params=params)
        with torch.no_grad():
            d = min(cfg["ema_decay"], (1 + step) / (10 + step))  # warm-up so early EMA is not stuck at init
            for pe, p in ema_pairs:
                pe.lerp_(p, 1 - d)
        return per.mean().item()

    _loop("unet", cfg["unet_steps"], start, progress, step_fn, save, cfg["ckpt_every"])
    _finish(cfg, work, "unet", dict(unet=ema_unet.state_dict(), text=ema_text.state_dict()))


# ---------------------------------------------------------------- stage: clip
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise so the scorer also reads decoded (softer, noisier) images."""
    b = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=g)
    x = x * (1 - mix) + blurred * mix
    return x + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


def features(out) -> torch.Tensor:
    """Projected CLIP features: transformers 5 wraps them in an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unnamed_bg_data(cfg: dict, combos: list, tok) -> dict:
    """Shapes on unnamed backgrounds, captioned without one: in the training combinations some
    (size, colour) pairs show each shape on one background only, so a scorer can read the shape
    off the background; here the background says nothing and the shape has to be read."""
    images, captions = dataset.make_unnamed_background_set(combos, cfg["clip_unnamed_bg_per_shape"], cfg["seed"] + 17)
    texts = sorted(set(captions))
    label = {c: i for i, c in enumerate(texts)}
    rng = np.random.default_rng(cfg["seed"] + 18)
    batch = cfg["clip_batch"] // 2
    return dict(images=images, labels=torch.tensor([label[c] for c in captions]), ids=_trim(token_ids(tok, texts), tok.eos_token_id),
                order=rng.integers(0, len(images), size=(cfg["clip_steps"], batch)))


def _unnamed_bg_loss(clip, data: dict, step: int, gen: torch.Generator) -> torch.Tensor:
    """Image -> caption cross-entropy over every background-free caption, and caption -> image over the batch."""
    idx = data["order"][step]
    logits = _logits(clip, _augment(clip_pixels(data["images"][idx]), gen), data["ids"])
    loss_i, loss_t = _contrastive(logits, data["labels"][torch.from_numpy(idx)])
    return 0.5 * (loss_i + loss_t)


def _text_shape_data(captions: list[str], tok) -> dict:
    """The background-free captions (token ids) and, per caption, the index of its own."""
    own = [dataset.background_free_caption(dataset.parse_caption(c)) for c in captions]
    texts = sorted(set(own))
    label = {c: i for i, c in enumerate(texts)}
    return dict(ids=_trim(token_ids(tok, texts), tok.eos_token_id), targets=torch.tensor([label[c] for c in own]))


def _text_shape_loss(clip, cand_ids: torch.Tensor, data: dict) -> torch.Tensor:
    """Text only: each training caption's embedding -> its own background-free caption's, over
    every background-free caption. Without it a caption whose (size, colour, background) was
    trained with one shape only is embedded by those three words, and its held-out shape twin
    lands next to it (small green squares on gray were ranked as circles)."""
    full = F.normalize(features(clip.get_text_features(input_ids=cand_ids)), dim=-1)
    txt = F.normalize(features(clip.get_text_features(input_ids=data["ids"])), dim=-1)
    return F.cross_entropy(clip.logit_scale.exp() * full @ txt.T, data["targets"])


def _trim(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Drop the padding columns after every caption's first end token: the text tower is causal
    and pools at that token, so the features are unchanged and training runs faster."""
    is_eos = ids == eos_id
    if not is_eos.any(1).all():  # a caption truncated before its end token: keep every column
        return ids
    return ids[:, : int(is_eos.int().argmax(1).max()) + 1]


def _logits(clip, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Scaled cosine logits, images x captions."""
    img = F.normalize(features(clip.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(features(clip.get_text_features(input_ids=ids)), dim=-1)
    return clip.logit_scale.exp() * img @ txt.T


def _contrastive(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> caption over every candidate caption, caption -> image over the batch) losses;
    logits is (images, captions), y each image's caption. A caption shared by several images in
    the batch spreads its target over all of them."""
    loss_i = F.cross_entropy(logits, y)
    pos = (y[None, :] == torch.arange(logits.shape[1])[:, None]).float()
    present = pos.sum(1) > 0
    logp = F.log_softmax(logits.T[present], dim=1)
    loss_t = -(logp * pos[present]).sum(1).div(pos[present].sum(1)).mean()
    return loss_i, loss_t


def clip_pixels(images_uint8: np.ndarray) -> torch.Tensor:
    """CLIP input for our scorer: [-1, 1] NCHW, the same as its image processor gives."""
    return to_tensor(images_uint8)


def train_clip(cfg: dict, work: Path, progress: bool = True):
    check_stages(cfg, work, ["clip"])
    if (work / "clip_final.pt").exists():
        return
    images, captions = train_data(cfg, work)
    tok = get_tokenizer(work)
    train_combos, _ = dataset.split_combinations()
    cand = [c.caption for c in train_combos]
    cand_ids = _trim(token_ids(tok, cand), tok.eos_token_id)
    label = {c: i for i, c in enumerate(cand)}
    labels = torch.tensor([label[c] for c in captions])
    torch.manual_seed(cfg["seed"] + 3)
    clip = models.build_clip(*special_ids(tok))
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg["clip_lr"], weight_decay=1e-2)
    # augmentation draws from per-step generators, not torch's global RNG: no RNG state to keep
    ck, save = _checkpoint(cfg, work, "clip", rng=False, model=clip, opt=opt)
    start = ck.resume()
    unnamed = _unnamed_bg_data(cfg, train_combos, tok) if cfg["clip_unnamed_bg_weight"] > 0 else None
    text_shape = _text_shape_data(cand, tok) if cfg["clip_text_shape_weight"] > 0 else None
    order_rng = np.random.default_rng(cfg["seed"] + 4)
    batches = order_rng.integers(0, len(images), size=(cfg["clip_steps"], cfg["clip_batch"]))

    def step_fn(step):
        _set_lr(opt, lr_at(step, cfg["clip_steps"], cfg["clip_lr"]))
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + step)
        idx = torch.from_numpy(batches[step])
        logits = _logits(clip, _augment(clip_pixels(images[idx.numpy()]), gen), cand_ids)
        loss_i, loss_t = _contrastive(logits, labels[idx])
        loss = 0.5 * (loss_i + loss_t)
        if unnamed is not None:
            loss = loss + cfg["clip_unnamed_bg_weight"] * _unnamed_bg_loss(clip, unnamed, step, gen)
        if text_shape is not None:
            loss = loss + cfg["clip_text_shape_weight"] * _text_shape_loss(clip, cand_ids, text_shape)
        value = _update(opt, loss)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        return value

    _loop("clip", cfg["clip_steps"], start, progress, step_fn, save, cfg["ckpt_every"])
    _finish(cfg, work, "clip", clip.state_dict())


# ---------------------------------------------------------------- stage: save
def save_models(cfg: dict, work: Path, out: Path):
    """Write data/models/tiny-sd (a diffusers pipeline), data/models/tiny-clip and, from the
    stages' stamps, data/models/training_config.json."""
    check_stages(cfg, work, ["save"])
    trained = trained_recipe(work)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    tok = get_tokenizer(work)
    lat = cache_latents(cfg, work)
    vae = load_vae(work)
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    state = torch.load(work / "unet_final.pt", weights_only=True)
    unet = models.build_unet()
    unet.load_state_dict(state["unet"])
    text = models.build_text_encoder(*special_ids(tok))
    text.load_state_dict(state["text"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=models.build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd_dir, clip_dir = Path(out) / "tiny-sd", Path(out) / "tiny-clip"
    pipe.save_pretrained(sd_dir, safe_serialization=True)
    _copy_bpe_files(work, sd_dir / "tokenizer")

    clip = models.build_clip(*special_ids(tok))
    clip.load_state_dict(torch.load(work / "clip_final.pt", weights_only=True))
    clip.save_pretrained(clip_dir, safe_serialization=True)
    tok.save_pretrained(clip_dir)
    _copy_bpe_files(work, clip_dir)
    # maps uint8 images to [-1, 1] at 64x64, exactly what the scorer was trained on
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 64}, do_center_crop=True, crop_size={"height": 64, "width": 64},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(clip_dir)
    (Path(out) / "training_config.json").write_text(json.dumps(trained, indent=2))


def _copy_bpe_files(work: Path, dest: Path):
    # vocab.json/merges.txt beside tokenizer.json: the form older loaders and Apple's scripts read
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(work / "tokenizer" / name, dest / name)


STAGES = {"vae": train_vae, "vae_decoder": train_vae_decoder, "unet": train_unet, "clip": train_clip}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="vae,vae_decoder,unet,clip,save", help="comma-separated: vae, vae_decoder, unet, clip, save")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and caches (resume from here)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES) - {"save"}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}, save")
    check_stages(cfg, a.work, stages)  # before any stage runs
    for s in stages:
        t0 = time.time()
        if s == "save":
            save_models(cfg, a.work, a.out)
        else:
            STAGES[s](cfg, a.work, progress=not a.no_progress)
        print(f"[sdwork.tiny.train] stage {s} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

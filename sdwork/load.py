"""Load a Stable Diffusion pipeline: the embedded default, a local folder or a hub id.

Every spec goes through diffusers' `from_pretrained` with safetensors only, so
the embedded model exercises the same path as SD 1.5, 2.1-base or SDXL.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from sdwork import paths
from sdwork.errors import ModelNotFoundError


def resolve_spec(spec: str | os.PathLike) -> str:
    """Map "tiny" to the embedded model folder, a relative folder to one under the checkout
    (paths.spec); anything else passes through."""
    spec = str(spec)
    if spec == "tiny":
        if not (paths.TINY / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the embedded default model is missing from {paths.TINY}; restore sdwork/data/models from git "
                "or retrain it with `python -m sdwork.tiny.train`"
            )
        return str(paths.TINY)
    return paths.spec(spec)  # a relative folder: under the checkout, as every path parameter


def load_pipeline(spec: str | os.PathLike = "tiny", dtype: torch.dtype = torch.float32, progress: bool = True):
    """A diffusers pipeline on the CPU from "tiny", "tiny-random", a local folder or a hub id.

    "tiny-random" builds the embedded architecture with random weights (seed 0),
    for tests that must not depend on trained weights.
    """
    if str(spec) == "tiny-random":
        return _random_tiny_pipeline(dtype)
    from diffusers import DiffusionPipeline

    source = resolve_spec(spec)
    path = Path(source).expanduser()
    local = path.exists()
    if local:
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder that "
                "save_pretrained wrote, for example one with unet/, vae/, text_encoder/, tokenizer/"
            )
    elif _looks_like_path(source):
        raise ModelNotFoundError(f"no model folder at {path}; check the path or pass a hub id such as org/name")
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path) if local else source,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=local or _offline(),
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as e:  # diffusers and safetensors raise many types for one cause: a bad folder
        raise load_error(e, path if local else source, local, "the pipeline") from e
    pipe.set_progress_bar_config(disable=not progress)
    pipe.model_spec = str(spec)
    return pipe


def load_error(e: Exception, source, local: bool, what: str, hub_label: str = "") -> ModelNotFoundError:
    """The error for a model folder or hub id that from_pretrained could not load, with the fix."""
    if local:
        return ModelNotFoundError(
            f"could not load {what} in {source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"{_damaged_hint(source)}")
    return ModelNotFoundError(
        f"could not load {hub_label}{source!r} from the Hugging Face hub ({'offline' if _offline() else 'online'}): "
        f"download it first (huggingface-cli download {source}) and pass the local folder, "
        f"or check the id. Cause: {str(e).splitlines()[0]}"
    )


def _damaged_hint(folder) -> str:
    """Name the weight file that does not read as safetensors, when one is the cause."""
    from safetensors import safe_open

    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    st.get_slice(k)
        except Exception:
            return (f"{f} is damaged (not a complete safetensors file, e.g. a truncated download): "
                    "download or save_pretrained the model again")
    return "Check that the folder is a complete diffusers pipeline saved with save_pretrained (safetensors)"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.sep + os.sep in spec


def _random_tiny_pipeline(dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    from sdwork.tiny import models

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=models.build_vae(),
        text_encoder=models.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id),
        tokenizer=tok,
        unet=models.build_unet(),
        scheduler=models.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.model_spec = "tiny-random"
    return pipe


def tiny_tokenizer():
    """The embedded architecture's BPE tokenizer, built from the dataset's words into the cache
    once (whole folder or nothing, so a concurrent or interrupted build is never half read)."""
    import shutil

    from sdwork.tiny import dataset, models, tokenizer

    folder = paths.cache_dir("tiny-random-tokenizer")
    if not (folder / "vocab.json").exists():
        tmp = folder.with_name(f".{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.build_tokenizer_files(dataset.vocabulary_words(), tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer.load_tokenizer(folder, models.MAX_LENGTH)

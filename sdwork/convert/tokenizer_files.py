"""vocab.json and merges.txt beside the packages: what a Swift app's BPE tokenizer loads.

transformers 5 tokenizers save tokenizer.json only, so the two files are written
from the backend's BPE model, then read back to check they tokenize identically.
"""
from __future__ import annotations

import json
from pathlib import Path

from sdwork.errors import ConfigError

CHECK_TEXT = "a small red circle on a gray background, photo 123 ünïcode"


def write_tokenizer_files(tokenizer, out_dir) -> dict[str, Path]:
    backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no tokenizers backend to read the BPE files from")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"the tokenizer is {model.get('type')}, not BPE: vocab.json/merges.txt do not apply")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab.write_text(json.dumps(model["vocab"], ensure_ascii=False))
    pairs = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merges.write_text("\n".join(["#version: 0.2"] + pairs) + "\n")
    _check_round_trip(tokenizer, vocab, merges)
    return {"vocab": vocab, "merges": merges}


def _check_round_trip(tokenizer, vocab: Path, merges: Path) -> None:
    from transformers import CLIPTokenizer

    again = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=tokenizer.model_max_length)
    a = tokenizer(CHECK_TEXT, padding="max_length", truncation=True).input_ids
    b = again(CHECK_TEXT, padding="max_length", truncation=True).input_ids
    if a != b:
        raise ConfigError(f"the written {vocab.name}/{merges.name} tokenize differently from the pipeline's "
                         f"tokenizer ({type(tokenizer).__name__}); it is not a CLIP BPE tokenizer")

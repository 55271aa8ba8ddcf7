"""Build a real CLIP BPE tokenizer (vocab.json + merges.txt) from a word list.

The files have the layout of OpenAI CLIP's: 256 byte symbols, the same with
the end-of-word marker, learned merges, then the two special tokens. Words of
the list become single tokens; any other text still tokenizes, byte by byte.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

EOW = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair until every word is one symbol."""
    enc = bytes_to_unicode()
    seqs = [[enc[b] for b in w.encode()] for w in words]
    for s in seqs:
        s[-1] += EOW
    merges = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        # ties broken by the pair itself so the files are reproducible
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        seqs = [_apply(s, pair) for s in seqs]
    return merges


def _apply(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def build_tokenizer_files(words: list[str], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + EOW for c in base]
    merges = learn_merges(words)
    tokens += ["".join(p) for p in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n")
    return out_dir


def load_tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )

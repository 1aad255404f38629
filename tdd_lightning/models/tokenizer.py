"""A CLIP BPE tokenizer made by hand, so tiny pipelines work offline (no hub vocabulary).

Byte-level characters are all in the vocabulary, so any text tokenizes; each word of an optional word
list gets merges that make it a single token (the toy's captions use that).
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def clip_vocab_and_merges(words: Iterable[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary plus merges that make every word in ``words`` one token."""
    chars = byte_symbols()
    vocab: dict[str, int] = {}
    for sym in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    # longer words first: their merges then outrank those of their prefixes
    for word in sorted({w.lower() for w in words if len(w) > 1}, key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def make_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A ``CLIPTokenizer`` over a hand-made vocabulary (``model_max_length`` must be set: STACK_NOTES)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )

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


def bpe_segments(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first, all occurrences) to a list of symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p), i, p) for i, p in enumerate(zip(symbols[:-1], symbols[1:], strict=True))]
        ranked = [x for x in pairs if x[0] is not None]
        if not ranked:
            break
        _, _, best = min(ranked)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_vocab_and_merges(words: Iterable[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary plus merges that make every word in ``words`` one token.

    Words are added one at a time: each is first segmented with the merges made so far, then joined
    left to right by new merges ranked after all earlier ones. A new merge can never pre-empt an
    earlier word's own merges (those always rank lower), so every word stays one token.
    """
    chars = byte_symbols()
    vocab: dict[str, int] = {}
    for sym in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(sym, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        segments = bpe_segments(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = segments[0]
        for right in segments[1:]:
            ranks.setdefault((left, right), len(ranks))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    merges = sorted(ranks, key=ranks.get)
    return vocab, merges


def make_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A ``CLIPTokenizer`` over a hand-made vocabulary (``model_max_length`` set, or pipelines overflow)."""
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


T5_PAD, T5_EOS, T5_UNK, T5_SPACE = "<pad>", "</s>", "<unk>", "\u2581"


def t5_unigram_vocab(words: Iterable[str] = ()) -> list[tuple[str, float]]:
    """A T5-shaped Unigram vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then one piece per word
    (``"\u2581word"``, so each word is one token), then the printable ASCII characters as a fallback
    (a word outside ``words`` splits into characters; a non-ASCII character becomes ``<unk>``)."""
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, -2.0)]
    seen = {p for p, _ in vocab}
    for word in sorted({w.lower() for w in words}):
        if T5_SPACE + word not in seen:
            vocab.append((T5_SPACE + word, -1.0))
            seen.add(T5_SPACE + word)
    for c in map(chr, range(ord("!"), ord("~") + 1)):
        if c not in seen:
            vocab.append((c, -10.0))
    return vocab


def make_t5_tokenizer(words: Iterable[str] = (), model_max_length: int = 32):
    """A ``T5Tokenizer`` (fast, Unigram) over a hand-made vocabulary: no BOS, ``</s>`` appended, pad id 0,
    lower-cased input is the caller's job (the toy's captions are lower case). ``model_max_length``
    records the text length the tiny FLUX teacher is trained and sampled with (FluxPipeline's
    ``max_sequence_length``: T5 runs without a padding mask, so the length changes the embeddings)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_unigram_vocab(words), extra_ids=0, model_max_length=model_max_length)

"""VocabBytes (CPU lane): per-token byte join == tokenizer.decode, for every tokenizer family.

The tokenizers here are built locally with the `tokenizers` library in the shapes real models
use (decoders copied from transformers' Llama/Gemma/GPT-2 conversions) and wrapped as
transformers PreTrainedTokenizerFast. tests/test_gpu_scoring.py imports the builders.
"""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from grm_engine.parsing import parse_scores_reference
from grm_engine.vocab_bytes import FLAG_BYTE_TOKEN, FLAG_DELIMITER, FLAG_SKIPPED, VocabBytes, _bytes_to_unicode

# Fragments of score groups and critique text; each family turns them into tokens its way.
FRAGMENTS = ["\\boxed{", "\\boxed", "\\", "box", "ed", "ed{", "{", "}", "}.", "[[", "[", "]", "]]", "]]\n", "{7",
             "7,", ", ", ",", " ", "  ", "\n", "\t", "7", "8", "10", "1", "0", "5", ".", ".5", "7.5", "e", "E", "e1",
             "-", "+", "Scores", " Scores:", " the", "Response", " 3", "x", "é", "日本", "😀", "Ġ", "▁", "abc{",
             "}]", "[[8", "9]]", "1e-2", "inf", "nan"]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen / Llama 3 style: ByteLevel decoder over a 256-char byte alphabet."""
    to_char = {b: c for c, b in _bytes_to_unicode().items()}
    tokens = [to_char[b] for b in range(256)]
    pieces = FRAGMENTS + ["\u00e9"[:1].encode()[:1].decode("latin-1"), "\u2581"]
    for fragment in pieces:
        token = "".join(to_char[b] for b in fragment.encode())
        if token not in tokens:
            tokens.append(token)
    tokens.append("".join(to_char[b] for b in "日".encode()[:2]))  # a partial UTF-8 character
    tokens.append("".join(to_char[b] for b in "😀".encode()[1:]))  # continuation bytes only
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(["<think>", "a b}"])  # added, not special: decode keeps them (a space is not in the alphabet)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _sentencepiece_vocab(split_words: bool) -> dict[str, int]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    ascii_chars = [chr(c) for c in range(33, 127)] + ["\n", "\t"]
    for fragment in ascii_chars + FRAGMENTS + ["▁\\boxed{", "▁7", "▁8", "▁10", "▁Scores:", "▁▁", "▁", "7▁8", "a▁b", "▁[[", "▁}", "[[7▁8]]", "\\boxed{1,▁2}", "▁[[3]]"]:
        token = fragment.replace(" ", "▁")
        if not split_words and token.count("▁") > 1:
            continue
        if token not in tokens:
            tokens.append(token)
    return {t: i for i, t in enumerate(tokens)}


def llama2_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2 style: ▁ word marker, <0xNN> byte fallback, the leading space stripped."""
    tok = Tokenizer(models.BPE(vocab=_sentencepiece_vocab(True), merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma style: like Llama 2 but no strip, and pieces with several ▁."""
    vocab = _sentencepiece_vocab(True)
    vocab["<pad>"], vocab["<eos>"], vocab["<bos>"] = len(vocab), len(vocab) + 1, len(vocab) + 2
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Metaspace decoder (T5 / newer SentencePiece conversions): every ▁ of the first token dropped."""
    tok = Tokenizer(models.BPE(vocab=_sentencepiece_vocab(True), merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


FAMILIES = {"byte_level": byte_level_tokenizer, "llama2": llama2_tokenizer, "gemma": gemma_tokenizer,
            "metaspace": metaspace_tokenizer}


def random_ids(rng: random.Random, vocab: VocabBytes, length: int) -> list[int]:
    """Ids biased to the interesting ones: delimiters, digits, byte tokens, specials, unknown ids."""
    interesting = [i for i in range(vocab.vocab_size) if vocab.flags[i] or vocab.token_bytes[i].strip(b" ").isdigit()]
    ids = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.5:
            ids.append(rng.choice(interesting))
        elif roll < 0.97:
            ids.append(rng.randrange(vocab.vocab_size))
        else:
            ids.append(vocab.vocab_size + rng.randrange(5))  # unknown: decode drops it
    return ids


def segment(rng: random.Random, vocab: VocabBytes, text: bytes, cut: int | None = None) -> list[int]:
    """Random token ids whose (non-first) bytes join to `text`, with a token boundary at `cut`."""
    if cut is not None:
        return segment(rng, vocab, text[:cut]) + segment(rng, vocab, text[cut:])
    by_bytes = getattr(vocab, "_test_by_bytes", None)
    if by_bytes is None:
        by_bytes = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and not vocab.special[i]:
                by_bytes.setdefault(b, []).append(i)
        vocab._test_by_bytes = by_bytes
    ids, position = [], 0
    while position < len(text):
        options = [text[position:end] for end in range(position + 1, min(len(text), position + 12) + 1)
                   if text[position:end] in by_bytes]
        piece = rng.choice(options)
        ids.append(rng.choice(by_bytes[piece]))
        position += len(piece)
    return ids


def random_group(rng: random.Random, count: int) -> str:
    values = [rng.choice(["7", "8", "10", "1", "0", "5", "7.5", ".5", "8.", "1e1", "-2", "+3", "11", "x", ""])
              for _ in range(count)]
    sep = rng.choice([",", ", ", " ,", ",\n"])
    body = sep.join(values)
    return rng.choice(["\\boxed{%s}", "[[%s]]", "\\boxed{%s", "[[%s]", "\\boxed{ %s }."]) % body


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    tokenizer = FAMILIES[request.param]()
    return request.param, tokenizer, VocabBytes(tokenizer)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_join_equals_decode_on_random_ids(family):
    name, tokenizer, vocab = family
    rng = random.Random(hash(name) % 1000)
    for trial in range(400):
        ids = random_ids(rng, vocab, rng.randint(0, 24))
        assert vocab.decode_bytes(ids) == _decode(tokenizer, ids).encode(), (name, ids)


def test_parse_view_parses_like_decoded_text(family):
    """The GPU's byte view (no U+FFFD, no whole-text strip) gives the same parse as the text."""
    name, tokenizer, vocab = family
    rng = random.Random(7)
    texts, views, counts = [], [], []
    for trial in range(400):
        count = rng.randint(1, 3)
        planted = segment(rng, vocab, random_group(rng, count).encode())
        ids = random_ids(rng, vocab, rng.randint(0, 6)) + planted + random_ids(rng, vocab, rng.randint(0, 4))
        texts.append(_decode(tokenizer, ids))
        views.append(vocab.parse_view_bytes(ids).decode("latin-1"))  # non-ASCII bytes stay non-ASCII
        counts.append(count)
    want, got = parse_scores_reference(texts, counts), parse_scores_reference(views, counts)
    assert got.status.tolist() == want.status.tolist()
    assert got.scores.nan_to_num(-99).tolist() == want.scores.nan_to_num(-99).tolist()
    assert (want.status == 0).sum() > 20  # the planted groups do parse


def test_flags_and_tables(family):
    name, tokenizer, vocab = family
    entries, blob = vocab.entries, bytes(vocab.blob.tolist())
    for i in range(vocab.vocab_size):
        start, length, first_start, first_length = entries[i].tolist()
        assert blob[start:start + length] == vocab.token_bytes[i]
        assert blob[first_start:first_start + first_length] == vocab.first_bytes[i]
        flags = int(vocab.flags[i])
        assert bool(flags & FLAG_SKIPPED) == bool(vocab.special[i] or vocab.unknown[i])
        assert bool(flags & FLAG_BYTE_TOKEN) == bool(vocab.byte_token[i])
        assert bool(flags & FLAG_DELIMITER) == any(c in vocab.token_bytes[i] + vocab.first_bytes[i] for c in b"{}[]")
    if name in ("llama2", "gemma"):
        assert int(vocab.byte_token.sum()) == 256


def test_invalid_byte_run_becomes_replacement_chars():
    tokenizer = llama2_tokenizer()
    vocab = VocabBytes(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["x", "<0x7D>", "<0xE2>", "<s>", "<0x7D>", "7"])
    assert vocab.decode_bytes(ids) == _decode(tokenizer, ids).encode() == "x\ufffd\ufffd\ufffd7".encode()
    assert vocab.parse_view_bytes(ids) == b"x\x80\x80\x807"  # the '}' inside the run is gone


def test_unsupported_decoders_raise():
    def with_decoder(decoder):
        tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
        tok.decoder = decoder
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    with pytest.raises(ValueError, match="WordPiece"):
        VocabBytes(with_decoder(decoders.WordPiece()))
    with pytest.raises(ValueError, match="could change the parse"):
        VocabBytes(with_decoder(decoders.Sequence([decoders.Fuse(), decoders.Strip(content="[", left=1)])))
    with pytest.raises(ValueError, match="last decoder step"):
        VocabBytes(with_decoder(decoders.Sequence([decoders.ByteLevel(), decoders.Replace("a", "b")])))


def test_no_decoder_joins_with_spaces():
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "[[7]]": 2}, merges=[]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    vocab = VocabBytes(tokenizer)
    for ids in ([0, 1, 2], [2], [1, 0]):
        assert vocab.decode_bytes(ids) == _decode(tokenizer, ids).encode()


def test_raw_tokenizers_object_and_slow_tokenizer_error():
    raw = byte_level_tokenizer().backend_tokenizer
    vocab = VocabBytes(raw)
    ids = [5, 300, 64, 2]
    assert vocab.decode_bytes(ids) == raw.decode(ids, skip_special_tokens=True).encode()
    with pytest.raises(TypeError, match="fast"):
        VocabBytes(object())

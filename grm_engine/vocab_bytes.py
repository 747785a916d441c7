"""VocabBytes: a token id -> bytes table, so generated ids can be parsed without detokenizing.

The rule (checked against `tokenizer.decode(ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)` at construction and in tests/test_vocab_bytes.py):

  decode(ids) = post(join(piece(id, first=(position == 0)) for id in kept(ids)))

  kept:   drop special tokens and ids the tokenizer does not know (tokenizers drops both
          before its decoder runs, so they never split a byte-fallback run).
  piece:  the token string after the decoder's per-token steps (Replace, Metaspace, per-token
          Strip, ByteLevel's char -> byte map), as bytes. Metaspace drops every "▁" of the
          FIRST kept token instead of turning it into a space, hence a second, "first" table.
  runs:   consecutive byte-fallback tokens `<0xNN>` form one run; a run that is valid UTF-8
          gives its bytes, an invalid run gives U+FFFD once per token (tokenizers' ByteFallback).
  post:   byte-level tokenizers decode the joined bytes as UTF-8 with U+FFFD replacement;
          a Strip after Fuse removes leading/trailing characters of the whole text.

What the GPU parser reads (`parse_view_bytes`) is the join WITHOUT the two whole-text steps
and with each token of an invalid run read as one byte 0x80. Both differences only touch
non-ASCII bytes, or whitespace that cannot lie inside a score group, and parse_scores looks at
ASCII delimiters, digits and whitespace only, so the parse of the view equals the parse of the
decoded text (a U+FFFD run and a raw non-ASCII run are both "a non-ASCII stretch"; ASCII bytes
keep their order). tests/test_vocab_bytes.py checks both equalities on random ids.
Decoders outside this rule (WordPiece, CTC, regex Replace, steps after ByteLevel, ...) raise
ValueError at construction rather than parse wrong.
"""
from __future__ import annotations

import json
import random

import numpy as np
import torch

# Flag bits of VocabBytes.flags (read by csrc/cuda/score_parser.cu; keep in sync).
FLAG_SKIPPED = 1       # special token: contributes nothing, does not break a byte run
FLAG_BYTE_TOKEN = 2    # `<0xNN>` byte-fallback token; its byte is the one table byte
FLAG_DELIMITER = 4     # contains one of { } [ ] (either table), so the backward scan must look inside
_DELIMITERS = frozenset(b"{}[]")
REPLACEMENT = "\ufffd".encode()


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's printable-char alphabet for bytes (the ByteLevel pre-tokenizer's map), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_CHAR_TO_BYTE = _bytes_to_unicode()


def _byte_fallback_value(token: str) -> int | None:
    """tokenizers' ByteFallback test: exactly `<0x` + 2 chars + `>`, parsed as a u8 in base 16."""
    if len(token.encode()) != 6 or not token.startswith("<0x") or not token.endswith(">"):
        return None
    digits = token[3:5]
    body = digits[1:] if digits.startswith("+") else digits  # Rust's from_str_radix takes a '+'
    if not body or any(c not in "0123456789abcdefABCDEF" for c in body):
        return None
    return int(body, 16)


def _strip(text: str, char: str, start: int, stop: int) -> str:
    cut = 0
    while cut < min(start, len(text)) and text[cut] == char:
        cut += 1
    end = len(text)
    while stop and end > cut and len(text) - end < stop and text[end - 1] == char:
        end -= 1
    return text[cut:end]


def _decoder_steps(tokenizer) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    decoder = backend.decoder
    if decoder is None:
        return []
    config = json.loads(decoder.__getstate__())
    return config["decoders"] if config["type"] == "Sequence" else [config]


class VocabBytes:
    """Per-token bytes of a transformers (fast) tokenizer, packed for the GPU score parser.

    entries [V, 4] int32: (start, length) of the token's bytes in `blob`, then (start, length)
    of its bytes when it is the first kept token; flags [V] uint8 (FLAG_*); blob [B] uint8.
    """

    def __init__(self, tokenizer, *, check_samples: int = 2000, seed: int = 0):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "get_added_tokens_decoder") or not hasattr(backend, "id_to_token"):
            raise TypeError(f"VocabBytes needs a fast (tokenizers-backed) tokenizer or a tokenizers.Tokenizer, "
                            f"got {type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.tokenizer = tokenizer
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.vocab_size = max([self.vocab_size] + [i + 1 for i in added])
        special = {i for i, t in added.items() if t.special}
        strings = [backend.id_to_token(i) for i in range(self.vocab_size)]
        self._build(strings, special, _decoder_steps(tokenizer))
        self._self_check(check_samples, seed)
        self._device_tables: dict = {}

    # -- construction ------------------------------------------------------------------------
    def _build(self, strings: list[str | None], special: set[int], steps: list[dict]) -> None:
        normal = [s for s in strings]
        first = [s for s in strings]
        byte_value = [None] * len(strings)
        self.lossy_utf8 = False
        self.text_strip = None  # (char, start, stop) applied to the whole text
        join_with_space = not steps  # tokenizers joins with " " when there is no decoder
        fused = False
        after_byte_fallback = False
        for index, step in enumerate(steps):
            kind = step["type"]
            where = f"decoder step {index} ({kind})"
            if fused and kind != "Strip":
                raise ValueError(f"VocabBytes: {where} after Fuse acts on the whole text; not representable per token")
            if kind == "Replace":
                pattern = step["pattern"]
                if "String" not in pattern:
                    raise ValueError(f"VocabBytes: {where} uses a regex pattern; only string patterns are supported")
                if after_byte_fallback:
                    raise ValueError(f"VocabBytes: {where} after ByteFallback sees merged byte runs; not supported")
                old, new = pattern["String"], step["content"]
                normal = [s.replace(old, new) if s is not None else None for s in normal]
                first = [s.replace(old, new) if s is not None else None for s in first]
            elif kind == "Metaspace":
                if after_byte_fallback:
                    raise ValueError(f"VocabBytes: {where} after ByteFallback is not supported")
                rep = step["replacement"]
                drop_first = step.get("prepend_scheme", "always") != "never"
                normal = [s.replace(rep, " ") if s is not None else None for s in normal]
                first = [(s.replace(rep, "") if drop_first else s.replace(rep, " ")) if s is not None else None
                         for s in first]
            elif kind == "Strip" and not fused:
                if after_byte_fallback:
                    raise ValueError(f"VocabBytes: {where} after ByteFallback sees merged byte runs; not supported")
                char, start, stop = step["content"], step["start"], step["stop"]
                normal = [_strip(s, char, start, stop) if s is not None else None for s in normal]
                first = [_strip(s, char, start, stop) if s is not None else None for s in first]
            elif kind == "Strip":
                char, start, stop = step["content"], step["start"], step["stop"]
                # A stripped leading char could begin `\boxed{` or `[[`, a trailing one end a group.
                if (start and char in "\\[") or (stop and char in "}]") or self.text_strip is not None:
                    raise ValueError(f"VocabBytes: {where} strips {char!r} from the text; it could change the parse")
                self.text_strip = (char, start, stop)
            elif kind == "ByteFallback":
                after_byte_fallback = True
                for i, s in enumerate(normal):
                    if s is not None and i not in special:
                        byte_value[i] = _byte_fallback_value(s)
                        if byte_value[i] is not None and _byte_fallback_value(first[i]) != byte_value[i]:
                            raise ValueError(f"VocabBytes: token {i} is a byte token only when not first")
            elif kind == "Fuse":
                fused = True
            elif kind == "ByteLevel":
                if index != len(steps) - 1 or after_byte_fallback:
                    raise ValueError(f"VocabBytes: {where} must be the last decoder step")
                self.lossy_utf8 = True
            else:
                raise ValueError(f"VocabBytes: {where} is not supported (supported: ByteLevel, Replace with a string, "
                                 "Metaspace, ByteFallback, Fuse, Strip)")
        self.token_bytes: list[bytes] = []
        self.first_bytes: list[bytes] = []
        for i, (s, f) in enumerate(zip(normal, first)):
            if s is None or i in special:
                self.token_bytes.append(b"")
                self.first_bytes.append(b"")
            elif byte_value[i] is not None:
                self.token_bytes.append(bytes([byte_value[i]]))
                self.first_bytes.append(bytes([byte_value[i]]))
            elif self.lossy_utf8:
                self.token_bytes.append(self._byte_level(s))
                self.first_bytes.append(self._byte_level(f))
            else:
                self.token_bytes.append((" " + s).encode() if join_with_space else s.encode())
                self.first_bytes.append(f.encode())
        self.special = np.zeros(self.vocab_size, dtype=bool)
        for i in special:
            self.special[i] = True
        self.unknown = np.array([s is None for s in strings], dtype=bool)
        self.byte_token = np.array([v is not None for v in byte_value], dtype=bool)
        self._pack()

    @staticmethod
    def _byte_level(token: str) -> bytes:
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        except KeyError:  # tokenizers keeps a token with a char outside the alphabet as its UTF-8
            return token.encode()

    def _pack(self) -> None:
        vocab = self.vocab_size
        blob = bytearray()
        entries = np.zeros((vocab, 4), dtype=np.int32)  # [V, 4]: start, length, first start, first length
        flags = np.zeros(vocab, dtype=np.uint8)
        for i in range(vocab):
            entries[i, 0], entries[i, 1] = len(blob), len(self.token_bytes[i])
            blob += self.token_bytes[i]
            if self.first_bytes[i] == self.token_bytes[i]:
                entries[i, 2], entries[i, 3] = entries[i, 0], entries[i, 1]
            else:
                entries[i, 2], entries[i, 3] = len(blob), len(self.first_bytes[i])
                blob += self.first_bytes[i]
            if self.special[i] or self.unknown[i]:
                flags[i] |= FLAG_SKIPPED
            if self.byte_token[i]:
                flags[i] |= FLAG_BYTE_TOKEN
            if _DELIMITERS & set(self.token_bytes[i] + self.first_bytes[i]):
                flags[i] |= FLAG_DELIMITER
        if len(blob) >= 2**31:
            raise ValueError(f"VocabBytes: {len(blob)} bytes of tokens do not fit int32 offsets")
        self.entries = torch.from_numpy(entries)
        self.flags = torch.from_numpy(flags)
        self.blob = torch.frombuffer(bytearray(blob) or bytearray(1), dtype=torch.uint8).clone()

    # -- host-side joins (the specification of what the tables mean) ---------------------------
    def _kept(self, ids) -> list[int]:
        return [i for i in ids if 0 <= i < self.vocab_size and not (self.special[i] or self.unknown[i])]

    def _pieces(self, kept: list[int], invalid_byte: bytes | None) -> list[bytes]:
        """Bytes per kept token; byte tokens of an invalid run become `invalid_byte` (None: U+FFFD)."""
        pieces = []
        position = 0
        while position < len(kept):
            token = kept[position]
            if self.byte_token[token]:
                end = position
                while end < len(kept) and self.byte_token[kept[end]]:
                    end += 1
                run = b"".join(self.token_bytes[t] for t in kept[position:end])
                try:
                    run.decode("utf-8")
                    pieces.extend(self.token_bytes[t] for t in kept[position:end])
                except UnicodeDecodeError:
                    pieces.extend([REPLACEMENT if invalid_byte is None else invalid_byte] * (end - position))
                position = end
            else:
                pieces.append(self.first_bytes[token] if position == 0 else self.token_bytes[token])
                position += 1
        return pieces

    def decode_bytes(self, ids) -> bytes:
        """Exactly `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` as UTF-8."""
        joined = b"".join(self._pieces(self._kept([int(i) for i in ids]), None))
        if not self.lossy_utf8 and self.text_strip is None:
            return joined
        text = joined.decode("utf-8", errors="replace")
        if self.text_strip is not None:
            text = _strip(text, *self.text_strip)
        return text.encode()

    def parse_view_bytes(self, ids) -> bytes:
        """The byte stream the GPU parser scans: same parse as decode_bytes (module docstring)."""
        return b"".join(self._pieces(self._kept([int(i) for i in ids]), b"\x80"))

    def _self_check(self, samples: int, seed: int) -> None:
        """Compare decode_bytes with the tokenizer on single tokens and random pairs/runs."""
        if samples <= 0:
            return
        rng = random.Random(seed)
        ids = list(range(min(self.vocab_size, samples)))
        ids += [rng.randrange(self.vocab_size) for _ in range(samples)] + list(np.flatnonzero(self.special))
        probes = [[i] for i in ids] + [[rng.choice(ids) for _ in range(rng.randint(2, 8))] for _ in range(samples)]
        raw = not hasattr(self.tokenizer, "backend_tokenizer")  # a tokenizers.Tokenizer: no cleanup step
        for probe in probes:
            if raw:
                expected = self.tokenizer.decode(probe, skip_special_tokens=True)
            else:
                expected = self.tokenizer.decode(probe, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            got = self.decode_bytes(probe)
            if got != expected.encode():
                raise ValueError(f"VocabBytes: this tokenizer's decode cannot be represented per token: ids {probe} "
                                 f"decode to {expected!r} but the table gives {got!r}")

    # -- device tables -------------------------------------------------------------------------
    def to(self, device) -> "VocabBytes":
        """Copies the tables to `device` once (cached); returns self."""
        self.device_tables(device)
        return self

    def device_tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = (self.entries.to(device).contiguous(), self.flags.to(device).contiguous(),
                                        self.blob.to(device).contiguous())
        return self._device_tables[key]

    def __repr__(self) -> str:
        return (f"VocabBytes(vocab_size={self.vocab_size}, blob={self.blob.numel()} bytes, "
                f"byte_tokens={int(self.byte_token.sum())}, special={int(self.special.sum())}, "
                f"lossy_utf8={self.lossy_utf8}, text_strip={self.text_strip})")

"""A character-level tokenizer over the 64-token vocabulary of the embedded tiny models."""

from __future__ import annotations

from collections.abc import Iterable

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=()<>,.:;?!^%|#_&@$~"


class CharTokenizer:
    """One id per character: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2 (as in the tiny presets),
    then digits ``0-9`` = 3..12, ``a-z`` = 13..38 and 25 punctuation marks / space = 39..63.
    """

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self):
        self._char_to_id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(ALPHABET)}
        self.vocab_size = len(SPECIAL_TOKENS) + len(ALPHABET)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no special tokens added)."""
        ids = []
        for pos, char in enumerate(text):
            if char not in self._char_to_id:
                raise ValueError(f"character {char!r} at position {pos} of {text!r} is not in the "
                                 f"tokenizer alphabet {ALPHABET!r}")
            ids.append(self._char_to_id[char])
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Text of ``ids``; ``<pad>``/``<bos>`` are skipped, and decoding stops at the first
        ``<eos>`` (or skips it, with ``stop_at_eos=False``)."""
        chars = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
            if token == self.eos_id and stop_at_eos:
                break
            if token >= len(SPECIAL_TOKENS):
                chars.append(ALPHABET[token - len(SPECIAL_TOKENS)])
        return "".join(chars)

"""CLIP byte-level BPE tokenizer: prompt text to the token ids the CLIP text encoders read.

The same vocabulary serves SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14); the
two differ only in the id used for padding. Text is cleaned the way OpenAI CLIP and open_clip
clean it (ftfy, HTML unescape, whitespace folding, lower-casing) so ids match what the text
encoders were trained on.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import json
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from keras_sd import bpe

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# The file holds 262,144 merges; CLIP uses only the first ones, so that 256 byte symbols, their
# 256 end-of-word forms, these merges and the two special tokens give 49,408 ids.
_NUM_MERGES = 48_894
# Bytes of one pre-tokenized word that BPE reads, bounding its work; the rest is dropped.
_MAX_WORD_BYTES = 65_536
# CLIP's pre-tokenizer: English contractions, letter runs, single digits, runs of anything else.
_WORD_PATTERN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE.

    BPE merges are written over characters, so every byte needs a visible, non-space
    character: printable Latin-1 bytes stand for themselves and the remaining 68 bytes take
    the characters from U+0100 on, in byte order. The insertion order (printable bytes first)
    is the order of the first 256 vocabulary ids.

    Returns:
        Dict from byte value (0-255) to a one-character string.

    Example:
        >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")]
        ('a', 'Ġ')
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, HTML unescape, whitespace folding, lower case.

    Args:
        text: raw prompt.

    Returns:
        The cleaned prompt.

    Example:
        >>> clean_text("  A  Caf\u00c3\u00a9 &amp;amp; Bar ")
        'a café & bar'
    """
    text = ftfy.fix_text(text)
    # Twice, because web captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@functools.cache
def _read_merges(path: str | None) -> tuple[tuple[str, str], ...]:
    if path is None:
        source = importlib.resources.files("keras_sd") / "assets" / _BUNDLED_VOCAB
        data = source.read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    # Line 0 is a version header.
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : 1 + _NUM_MERGES]
    merges = tuple(tuple(line.split()) for line in lines)
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"vocab_path={path!r} is not a CLIP BPE merges file: expected a header line and "
            f"{_NUM_MERGES} lines of two symbols each."
        )
    return merges


def _check_str(value, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}: {value!r}")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer with padding, truncation and added tokens.

    Args:
        vocab_path: a gzipped CLIP BPE merges file (`bpe_simple_vocab_16e6.txt.gz`);
            None uses the copy bundled with keras-sd.
        max_length: length of the rows returned by `__call__` (the text encoder's context).
        pad_token: token whose id fills rows after the end token: `"<|endoftext|>"` for SD 1.x
            (transformers/diffusers behaviour), `"!"` (id 0) for SD 2.x (open_clip behaviour).
            Any vocabulary entry or added token is accepted, as in a diffusers
            `tokenizer_config.json`.
        added_tokens: extra tokens (textual inversion placeholders), as for `add_tokens`.

    Example:
        >>> tokenizer = CLIPTokenizer()
        >>> tokenizer.encode("a photo of a cat")
        [49406, 320, 1125, 539, 320, 2368, 49407]
        >>> tokenizer(["a photo of a cat"]).shape
        (1, 77)
    """

    def __init__(
        self,
        vocab_path: str | None = None,
        max_length: int = 77,
        pad_token: str = END_TOKEN,
        added_tokens: Sequence[str] | None = None,
    ):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"`max_length` must be an int >= 2 (room for the start and end tokens), "
                f"got {max_length!r}"
            )
        _check_str(pad_token, "pad_token")
        self.vocab_path = None if vocab_path is None else str(vocab_path)
        self.max_length = max_length
        self.pad_token = pad_token

        merges = _read_merges(self.vocab_path)
        self._merges = merges
        symbols = list(bytes_to_unicode().values())
        self._id_to_token = [
            *symbols,
            *(s + _END_OF_WORD for s in symbols),
            *(a + b for a, b in merges),
            START_TOKEN,
            END_TOKEN,
        ]
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Added tokens by their original spelling, and the (cleaned) spellings matched in text.
        self._added: dict[str, int] = {}
        self._whole = {START_TOKEN: self.start_token_id, END_TOKEN: self.end_token_id}
        self._vectors: dict[str, list[int]] = {}  # multi-vector token -> all its ids
        self._compile_whole_pattern()
        # Bounded so a long-running service cannot grow it without limit; words repeat a lot.
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)
        self.add_tokens(added_tokens or [])
        self._pad_token_id = self._lookup(pad_token, "pad_token")

    # -- properties -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the text encoder's embedding rows)."""
        return len(self._id_to_token) + len(self._added)

    @property
    def start_token_id(self) -> int:
        """Id of `<|startoftext|>`, the first id of every encoded prompt."""
        return self._token_to_id[START_TOKEN]

    @property
    def end_token_id(self) -> int:
        """Id of `<|endoftext|>`, the last id of every encoded prompt."""
        return self._token_to_id[END_TOKEN]

    @property
    def pad_token_id(self) -> int:
        """Id that fills rows after the end token."""
        return self._pad_token_id

    @property
    def added_tokens(self) -> list[str]:
        """Tokens added with `add_tokens`, in id order."""
        return list(self._added)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt: start token, BPE ids, end token; no padding or truncation.

        Args:
            text: the prompt.

        Returns:
            List of ints (KerasCV's `SimpleTokenizer.encode` returns the same).

        Example:
            >>> CLIPTokenizer().encode("A cat!")
            [49406, 320, 2368, 256, 49407]
        """
        _check_str(text, "text")
        return [self.start_token_id, *self._encode_clean(clean_text(text)), self.end_token_id]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Padded, truncated token ids of a batch of prompts.

        Args:
            texts: one prompt or a list of prompts.

        Returns:
            int32 array [B, max_length]. Prompts longer than `max_length` are cut and keep the
            end token as their last id (as open_clip and transformers do); shorter ones are
            filled with `pad_token_id`.

        Example:
            >>> CLIPTokenizer(pad_token="!")("a cat")[0, :5]
            array([49406,   320,  2368, 49407,     0], dtype=int32)
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"`texts` must be a str or a list of str, got {type(texts).__name__}")
        out = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            _check_str(text, f"texts[{row}]")
            # Only the first max_length - 2 BPE ids survive truncation: stop encoding there.
            kept = self._encode_clean(clean_text(text), limit=self.max_length - 2)
            ids = [self.start_token_id, *kept[: self.max_length - 2], self.end_token_id]
            out[row, : len(ids)] = ids
        return out

    def _encode_clean(self, text: str, limit: int | None = None) -> list[int]:
        ids = []
        # split() with a capturing group alternates plain text and whole-matched tokens.
        for i, part in enumerate(self._whole_pattern.split(text)):
            if i % 2:
                ids.extend(self._vectors.get(part) or [self._whole[part]])
                continue
            for match in _WORD_PATTERN.finditer(part):
                if limit is not None and len(ids) >= limit:
                    return ids
                data = match.group().encode("utf-8")[:_MAX_WORD_BYTES]
                ids.extend(self._bpe("".join(map(self._byte_encoder.get, data))))
        return ids

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        symbols = bpe.merge([*word[:-1], word[-1] + _END_OF_WORD], self._ranks, self._merges)
        return tuple(self._token_to_id[s] for s in symbols)

    # -- added tokens ---------------------------------------------------------------------

    def add_tokens(self, tokens: str | Sequence[str], num_vectors: int = 1) -> list[int]:
        """Add whole-word tokens (e.g. textual inversion placeholders) to the vocabulary.

        An added token is matched in the cleaned prompt before BPE splitting, so
        "a photo of <cat-toy>" gives one id for "<cat-toy>". Matching uses the same cleanup as
        the prompt, so it ignores case, like transformers' added tokens. With `num_vectors`
        N > 1 each token `t` is added with `t_1`, ..., `t_{N-1}`, and `t` in a prompt stands
        for all N ids, as in diffusers and AUTOMATIC1111 (an added token `t` followed by
        added tokens `t_1`, `t_2`, ... expands the same way however it was added).

        Args:
            tokens: one token or a list of tokens.
            num_vectors: ids per token (the vectors of a multi-vector embedding).

        Returns:
            The new ids: `vocab_size`, `vocab_size + 1`, ... at the time of the call.

        Raises:
            ValueError: a token is empty after cleanup, repeated, or already has a single id
                (a vocabulary word such as "cat", a special or an added token), or
                `num_vectors` is not a positive int.

        Example:
            >>> tokenizer = CLIPTokenizer()
            >>> tokenizer.add_tokens(["<cat-toy>"])
            [49408]
            >>> tokenizer.encode("a photo of <cat-toy>")
            [49406, 320, 1125, 539, 49408, 49407]
            >>> tokenizer.add_tokens("<dog>", num_vectors=2), tokenizer.encode("<dog>")[1:-1]
            ([49409, 49410], [49409, 49410])
        """
        if isinstance(tokens, str):
            tokens = [tokens]
        elif not isinstance(tokens, Sequence):
            raise TypeError(f"`tokens` must be a str or a list of str, got {type(tokens).__name__}")
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"`num_vectors` must be an int >= 1, got {num_vectors!r}")
        [_check_str(token, f"tokens[{i}]") for i, token in enumerate(tokens)]
        tokens = [f"{t}_{k}" if k else t for t in tokens for k in range(num_vectors)]
        seen = set()
        for token in tokens:
            key = clean_text(token)
            if not key:
                raise ValueError(f"Cannot add token {token!r}: it is empty after text cleanup.")
            if key in seen:
                raise ValueError(f"Cannot add token {token!r}: it is given twice.")
            seen.add(key)
            existing = self._encode_clean(key)
            if len(existing) == 1:
                raise ValueError(
                    f"Cannot add token {token!r}: it is already in the vocabulary "
                    f"(id {existing[0]})."
                )
        new_ids = []
        for token in tokens:
            new_ids.append(self.vocab_size)
            self._added[token] = new_ids[-1]
            self._whole[clean_text(token)] = new_ids[-1]
        self._vectors = {}
        for token, token_id in self._added.items():
            ids, k = [token_id], 1
            while f"{token}_{k}" in self._added:
                ids.append(self._added[f"{token}_{k}"])
                k += 1
            if k > 1:
                self._vectors[clean_text(token)] = ids
        self._compile_whole_pattern()
        return new_ids

    def _compile_whole_pattern(self) -> None:
        # Longest first, so a token that extends another one wins.
        keys = sorted(self._whole, key=len, reverse=True)
        self._whole_pattern = regex.compile("(" + "|".join(map(regex.escape, keys)) + ")")

    def _lookup(self, token: str, name: str) -> int:
        if token in self._added:
            return self._added[token]
        if token in self._token_to_id:
            return self._token_to_id[token]
        raise ValueError(
            f"`{name}`={token!r} is not a vocabulary entry or added token; use e.g. "
            f"{END_TOKEN!r} (SD 1.x) or '!' (SD 2.x)."
        )

    # -- decoding -------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids: drops the start token and stops at the end token.

        Word ends become single spaces, so punctuation comes back space-separated
        ("a cat , sitting"); added tokens come back as whole words.

        Args:
            ids: token ids, e.g. one row of `__call__`'s output or `encode`'s result.

        Returns:
            The decoded text, without trailing space.

        Example:
            >>> tokenizer = CLIPTokenizer()
            >>> tokenizer.decode(tokenizer("A photo of a Cat")[0])
            'a photo of a cat'
        """
        id_to_added = {i: t for t, i in self._added.items()}
        pieces, symbols = [], []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"`ids` holds {i}, outside the vocabulary [0, {self.vocab_size})")
            if i == self.end_token_id:
                break
            if i == self.start_token_id:
                continue
            if i in id_to_added:
                pieces += [self._symbols_to_text(symbols), id_to_added[i] + " "]
                symbols = []
            else:
                symbols.append(self._id_to_token[i])
        pieces.append(self._symbols_to_text(symbols))
        return "".join(pieces).rstrip()

    def _symbols_to_text(self, symbols: list[str]) -> str:
        data = bytearray()
        for symbol in symbols:
            # Strip the marker per symbol: a prompt may itself contain the text "</w>".
            word_end = symbol.endswith(_END_OF_WORD)
            data += bytes(self._byte_decoder[c] for c in symbol.removesuffix(_END_OF_WORD))
            data += b" " if word_end else b""
        # Token boundaries can split a multi-byte character; decode the bytes together.
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, directory) -> tuple[str, str]:
        """Write `vocab.json` and `merges.txt`, the files of a diffusers `tokenizer/` folder.

        Added tokens are not part of these files (diffusers keeps them in
        `added_tokens.json`); the base vocabulary is written exactly.

        Args:
            directory: an existing folder.

        Returns:
            The paths of the two files written.

        Example:
            >>> import tempfile
            >>> vocab, merges = CLIPTokenizer().save_vocabulary(tempfile.mkdtemp())
            >>> vocab.endswith("vocab.json"), merges.endswith("merges.txt")
            (True, True)
        """
        vocab_path = os.path.join(os.fspath(directory), "vocab.json")
        merges_path = os.path.join(os.fspath(directory), "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(self._id_to_token)}, f, ensure_ascii=False)
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in self._merges) + "\n")
        return vocab_path, merges_path

    # -- config ---------------------------------------------------------------------------

    def get_config(self) -> dict:
        """Constructor arguments, added tokens included, for `from_config`."""
        return {
            "vocab_path": self.vocab_path,
            "max_length": self.max_length,
            "pad_token": self.pad_token,
            "added_tokens": self.added_tokens,
        }

    @classmethod
    def from_config(cls, config: dict) -> CLIPTokenizer:
        """Rebuild a tokenizer from `get_config()`'s output."""
        return cls(**config)

    def __reduce__(self):
        # Pickle/copy through the config: the per-instance BPE cache cannot be pickled, and
        # data-loader worker processes need to receive tokenizers.
        return (self.from_config, (self.get_config(),))

"""Tokenization in CPU tasks and padding of token batches.

Torch-free: it uses the `tokenizers` library on the model's `tokenizer.json` directly, so a Ray
Data tokenization task starts in milliseconds instead of importing torch and transformers. A
model without `tokenizer.json` (a slow-only tokenizer) falls back to transformers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from clvray.storage import Storage
from clvray.text.source import resolve_cached


class _FastTokenizer:
    """`tokenizers.Tokenizer` with truncation on and padding off (we pad per batch)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self._tok.no_padding()
        self._max: int | None = None

    def encode(self, texts: list[str], max_length_tokens: int) -> list[list[int]]:
        return self.encode_flagged(texts, max_length_tokens)[0]

    def encode_flagged(
        self, texts: list[str], max_length_tokens: int
    ) -> tuple[list[list[int]], list[bool]]:
        """Token ids, and whether each text lost tokens to the length limit."""
        if self._max != max_length_tokens:
            # Truncation counts the [CLS]/[SEP] the post-processor adds.
            self._tok.enable_truncation(max_length_tokens)
            self._max = max_length_tokens
        encodings = self._tok.encode_batch(texts)
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]


class _HFTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))

    def encode(self, texts: list[str], max_length_tokens: int) -> list[list[int]]:
        out = self._tok(
            texts,
            truncation=True,
            max_length=max_length_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return list(out["input_ids"])

    def encode_flagged(
        self, texts: list[str], max_length_tokens: int
    ) -> tuple[list[list[int]], list[bool]]:
        """As `_FastTokenizer.encode_flagged`; slow tokenizers report no overflow, so this
        fallback tokenizes once more without the limit to tell."""
        ids = self.encode(texts, max_length_tokens)
        full = self._tok(texts, truncation=False, return_length=True, verbose=False)["length"]
        return ids, [int(n) > max_length_tokens for n in full]


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> _FastTokenizer | _HFTokenizer:
    """One tokenizer per worker process and path (Ray reuses worker processes across tasks)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _FastTokenizer(path)
    return _HFTokenizer(path)


def tokenize_table(
    table: pa.Table, model_path: str, max_length_tokens: int, text_column: str = "text"
) -> pa.Table:
    """Replace `text` with `input_ids` (list<int32>), `n_tokens` and `truncated` (the text was
    longer than `max_length_tokens` and lost its end); rows sorted by length.

    Sorting inside the block buckets reviews of similar length, so the batches later cut from it
    need little padding (the encoder's cost follows the padded length, not the real one).
    """
    texts = [t if isinstance(t, str) else "" for t in table[text_column].to_pylist()]
    ids, truncated = (
        load_tokenizer(model_path).encode_flagged(texts, max_length_tokens) if texts else ([], [])
    )
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    out = table.drop_columns([text_column])
    out = out.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32())))
    out = out.append_column("n_tokens", pa.array(lengths, type=pa.int32()))
    out = out.append_column("truncated", pa.array(truncated, type=pa.bool_()))
    return out.take(pa.array(np.argsort(lengths, kind="stable"), type=pa.int64()))


def tokenize_reviews(
    table: pa.Table, model: str, storage: Storage | None, max_length_tokens: int
) -> pa.Table:
    """`tokenize_table` for a model spec: resolves (and caches) the model on this node first."""
    return tokenize_table(table, resolve_cached(model, storage), max_length_tokens)


def flat_tokens(
    sequences: Sequence[Any] | pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a batch of token sequences: a list array's own buffers, or one
    concatenation of Python sequences."""
    if isinstance(sequences, pa.ChunkedArray):
        sequences = sequences.combine_chunks()
    if isinstance(sequences, pa.Array):
        # a slice's offsets index into its parent's values: keep both as they are
        offsets = sequences.offsets.to_numpy().astype(np.int64)
        return sequences.values.to_numpy(zero_copy_only=False), offsets
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(seqs) if seqs else np.empty(0, dtype=np.int64)
    return values, offsets


def scatter_rows(
    values: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    width: int,
    pad_id: int,
    height: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 of shape (height or len(rows), width): row k holds
    sequence `rows[k]` of (values, offsets), padded with `pad_id` (no Python per row). Rows past
    len(rows) are blank and attend to their first (pad) token, so a mean over them is defined."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    height = n if height is None else height
    lengths = np.minimum(offsets[rows + 1] - offsets[rows], width)
    mask = np.zeros((height, width), dtype=np.int64)
    mask[:n] = np.arange(width)[None, :] < lengths[:, None]
    mask[n:, 0] = 1
    ids = np.full((height, width), pad_id, dtype=np.int64)
    # every kept token's source position: the row's offset plus its place inside the row
    starts = np.repeat(offsets[rows], lengths)
    within = np.arange(starts.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids[:n][mask[:n].astype(bool)] = values[starts + within]
    return ids, mask


def pad_token_ids(
    sequences: Sequence[Any] | pa.Array | pa.ChunkedArray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 arrays padded to the longest sequence in the batch."""
    values, offsets = flat_tokens(sequences)
    n = len(offsets) - 1
    width = max(int(np.diff(offsets).max()) if n else 1, 1)
    return scatter_rows(values, offsets, np.arange(n), width, pad_id)

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
        if self._max != max_length_tokens:
            # Truncation counts the [CLS]/[SEP] the post-processor adds.
            self._tok.enable_truncation(max_length_tokens)
            self._max = max_length_tokens
        return [e.ids for e in self._tok.encode_batch(texts)]


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


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> _FastTokenizer | _HFTokenizer:
    """One tokenizer per worker process and path (Ray reuses worker processes across tasks)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _FastTokenizer(path)
    return _HFTokenizer(path)


def tokenize_table(
    table: pa.Table, model_path: str, max_length_tokens: int, text_column: str = "text"
) -> pa.Table:
    """Replace `text` with `input_ids` (list<int32>) and `n_tokens`; rows sorted by length.

    Sorting inside the block buckets reviews of similar length, so the batches later cut from it
    need little padding (the encoder's cost follows the padded length, not the real one).
    """
    texts = [t if isinstance(t, str) else "" for t in table[text_column].to_pylist()]
    ids = load_tokenizer(model_path).encode(texts, max_length_tokens) if texts else []
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    out = table.drop_columns([text_column])
    out = out.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32())))
    out = out.append_column("n_tokens", pa.array(lengths, type=pa.int32()))
    return out.take(pa.array(np.argsort(lengths, kind="stable"), type=pa.int64()))


def tokenize_reviews(
    table: pa.Table, model: str, storage: Storage | None, max_length_tokens: int
) -> pa.Table:
    """`tokenize_table` for a model spec: resolves (and caches) the model on this node first."""
    return tokenize_table(table, resolve_cached(model, storage), max_length_tokens)


def pad_token_ids(
    sequences: Sequence[Any] | pa.Array | pa.ChunkedArray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 arrays padded to the longest sequence in the batch."""
    if isinstance(sequences, pa.ChunkedArray):
        sequences = sequences.combine_chunks()
    if isinstance(sequences, pa.Array):
        offsets = sequences.offsets.to_numpy()
        values = sequences.values.to_numpy(zero_copy_only=False)
        seqs: list[Any] = [values[offsets[i] : offsets[i + 1]] for i in range(len(sequences))]
    else:
        seqs = list(sequences)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    width = max(int(lengths.max()) if len(seqs) else 1, 1)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask

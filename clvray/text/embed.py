"""Review embeddings with Ray Data: CPU tokenization tasks feeding an actor pool of encoders.

Tokenization runs in plain CPU tasks ahead of the encoder actors, so GPU actors never wait on
Python string work, and each tokenization block is sorted by length so the encoder batches cut
from it carry little padding. Tokenize tasks ask for `embed.tokenize_cpus` (not the actors'
CPUs), which keeps them a separate operator: Ray would otherwise fuse them into the actors and
the model would wait on string work. Torch threads per actor: `clvray.resources.embed_threads`.
The encoder is loaded once per actor (`ReviewEncoder.__init__`) and
runs under `torch.inference_mode()`, its weights in bf16 on GPUs that support it.

Output rows (one per input review before the cutoff, none dropped or duplicated):

| column | type |
|---|---|
| customer_id, review_id | string |
| ts | timestamp[us, UTC] |
| embedding | fixed_size_list<float32 or float16>[hidden] (`embed.dtype`), mean of the token vectors |
| score | float32: the head's prediction (fine-tuned model: predicted rating on the 1..5 scale, or churn probability, as the model's `clvray_text.json` says); null for a pretrained encoder without a head |
| truncated | bool: the review was longer than `text.max_length_tokens` and only its start was embedded (the embed stage's marker counts them) |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from clvray import observability
from clvray.config import EmbedSection, TextSection
from clvray.contract import TS, as_utc
from clvray.resources import Cluster, embed_actors, embed_threads
from clvray.storage import Storage
from clvray.text.encoder import LoadedTextModel, load_text_model, pad_batch, pick_device, pick_dtype
from clvray.text.partition import before_cutoff, require_columns
from clvray.text.source import resolve_model_path
from clvray.text.tokens import flat_tokens, scatter_rows, tokenize_reviews

if TYPE_CHECKING:
    from ray.data import Dataset

REVIEW_COLUMNS = ["customer_id", "review_id", "ts", "text"]


class ReviewEncoder:
    """Callable class for `map_batches` on an actor pool: tokenized reviews in, embeddings out.

    `loader` turns a resolved model path into a `LoadedTextModel`; it is the seam through which
    a test hands the actor a tiny model (and counts how often it is called).
    """

    def __init__(
        self,
        model: str,
        storage: Storage | None = None,
        use_gpu: bool = False,
        dtype: str = "float32",
        loader: Callable[[str], LoadedTextModel] = load_text_model,
        torch_threads: int | None = None,
        fixed_shapes: tuple[int, int] | None = (
            EmbedSection().micro_batch,
            EmbedSection().length_bucket,
        ),
    ) -> None:
        """`fixed_shapes`: (rows, length bucket) of every encoder call (`EmbedSection.
        fixed_shapes`), or None for one call per batch padded to its longest review."""
        if torch_threads:
            # Ray gives an actor one OpenMP thread per CPU it holds; the stage decides instead.
            torch.set_num_threads(torch_threads)
        self.loaded = loader(resolve_model_path(model, storage))
        self.device = pick_device(use_gpu)
        encoder = self.loaded.model.encoder
        # Inference needs no fp32 master weights: the encoder runs in bf16 outright on GPUs
        # that support it; pooling and the head stay float32.
        encoder.to(device=self.device, dtype=pick_dtype(self.device))
        if self.loaded.model.head is not None:
            self.loaded.model.head.to(self.device)
        self.loaded.model.eval()
        self.pad_id = int(getattr(self.loaded.tokenizer, "pad_token_id", None) or 0)
        self.out_type = pa.float16() if dtype == "float16" else pa.float32()
        self.fixed_shapes = fixed_shapes

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            pooled, raw = self.loaded.model(
                torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            )
            score = (
                self.loaded.head.to_score(raw.float())
                if raw is not None and self.loaded.head
                else None
            )
        return pooled.float().cpu().numpy(), None if score is None else score.cpu().numpy()

    def _encode_fixed(self, sequences: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """Every call has shape (rows, bucket): a row's result depends on its tokens alone (a
        GEMM's rounding changes with its shape, not with the other rows' values)."""
        rows, bucket = self.fixed_shapes  # type: ignore[misc]
        values, offsets = flat_tokens(sequences)
        lengths = np.diff(offsets)
        width = np.maximum(-(-lengths // bucket) * bucket, bucket)
        order = np.lexsort((np.arange(len(lengths)), width))
        pooled: np.ndarray | None = None
        scores: np.ndarray | None = None
        for w in np.unique(width):
            group = order[width[order] == w]
            for start in range(0, len(group), rows):
                chunk = group[start : start + rows]
                n = len(chunk)
                ids, mask = scatter_rows(values, offsets, chunk, int(w), self.pad_id, rows)
                emb, score = self._encode(ids, mask)
                if pooled is None:
                    pooled = np.empty((len(lengths), emb.shape[1]), dtype=np.float32)
                pooled[chunk] = emb[:n]
                if score is not None:
                    if scores is None:
                        scores = np.empty(len(lengths), dtype=np.float32)
                    scores[chunk] = score[:n]
        if pooled is None:  # an empty batch
            hidden = int(self.loaded.model.encoder.config.hidden_size)
            pooled = np.empty((0, hidden), dtype=np.float32)
            if self.loaded.head is not None:
                scores = np.empty(0, dtype=np.float32)
        return pooled, scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fixed_shapes:
            sequences = batch["input_ids"]
            if isinstance(sequences, pa.ChunkedArray):
                sequences = sequences.combine_chunks()
            emb, score = self._encode_fixed(sequences)
        else:
            ids, mask = pad_batch(batch["input_ids"], self.pad_id)
            emb, score = self._encode(ids.numpy(), mask.numpy())
        observability.record_reviews_embedded(len(emb), fine_tuned=self.loaded.head is not None)
        hidden = emb.shape[1]
        values = pa.array(
            emb.reshape(-1).astype(self.out_type.to_pandas_dtype()), type=self.out_type
        )
        if score is not None:
            scores = pa.array(score.astype(np.float32), type=pa.float32())
        else:
            scores = pa.nulls(len(emb), type=pa.float32())  # no head: nothing to predict
        return pa.table(
            {
                "customer_id": pc.cast(batch["customer_id"], pa.string()),
                "review_id": pc.cast(batch["review_id"], pa.string()),
                "ts": pc.cast(batch["ts"], TS),
                "embedding": pa.FixedSizeListArray.from_arrays(values, hidden),
                "score": scores,
                "truncated": truncated_flags(batch),
            }
        )


def truncated_flags(batch: pa.Table) -> pa.Array:
    """The tokenizer's `truncated` column (all false for input tokenized without it)."""
    if "truncated" in batch.column_names:
        return pc.fill_null(pc.cast(batch["truncated"], pa.bool_()), False).combine_chunks()
    return pa.array(np.zeros(batch.num_rows, dtype=bool), type=pa.bool_())


def fixed_shapes(emb: EmbedSection) -> tuple[int, int] | None:
    return (emb.micro_batch, emb.length_bucket) if emb.fixed_shapes else None


def embed_reviews(
    reviews_ds: Dataset,
    model_path: str,
    cfg: TextSection,
    cutoff: Any = None,
    storage: Storage | None = None,
    loader: Callable[[str], LoadedTextModel] | None = None,
) -> Dataset:
    """Embed every review of `reviews_ds` (with `cutoff`, only those with `ts < cutoff`).

    `model_path` is a model spec (`resolve_model_path`): a fine-tuned model's URI or a
    pretrained one. Lazy: nothing runs until the result is consumed or written. Cost: one
    streaming pass; tokenization on `cpus` tasks, encoding on `embed.min_actors` to
    `embed.max_actors` actors with `embed.num_gpus_per_actor` GPUs each.
    """
    import ray.data

    emb = cfg.embed
    require_columns(reviews_ds, REVIEW_COLUMNS, "reviews")
    ds = reviews_ds.select_columns(REVIEW_COLUMNS)
    if cutoff is not None:
        ds = ds.map_batches(
            before_cutoff, fn_kwargs={"cutoff": as_utc(cutoff)}, batch_format="pyarrow"
        )
    tokenized = ds.map_batches(
        tokenize_reviews,
        fn_kwargs={
            "model": model_path,
            "storage": storage,
            "max_length_tokens": cfg.max_length_tokens,
        },
        batch_size=emb.tokenize_batch_size,
        batch_format="pyarrow",
        # Resources unlike the actors' keep tokenization a separate operator (Ray fuses maps
        # with equal resources into the actor), so the encoder never waits on string work.
        num_cpus=emb.tokenize_cpus,
    )
    use_gpu = emb.num_gpus_per_actor > 0
    cluster = Cluster.current()
    return tokenized.map_batches(
        ReviewEncoder,
        fn_constructor_kwargs={
            "model": model_path,
            "storage": storage,
            "use_gpu": use_gpu,
            "dtype": emb.dtype,
            "loader": loader or load_text_model,
            "torch_threads": embed_threads(emb, cluster),
            "fixed_shapes": fixed_shapes(emb),
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=emb.min_actors, max_size=embed_actors(emb, cluster)
        ),
        num_gpus=emb.num_gpus_per_actor if use_gpu else None,
        num_cpus=emb.cpus_per_actor,
        batch_size=emb.batch_size,
        batch_format="pyarrow",
    )

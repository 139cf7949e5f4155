"""The text path: encoder loading, fine-tuning with failure recovery, embedding, text features.

Unit tests run on plain pyarrow / pandas / torch; integration tests share the session's local
Ray and a tiny BERT built from the synthetic vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from clvray.config import SyntheticSection, TextSection
from clvray.storage import Storage, join
from clvray.synth import generate_chunk
from clvray.text.encoder import (
    META_FILE,
    TextModel,
    load_encoder,
    load_text_model,
    load_tokenizer,
    pad_batch,
    pick_device,
    pick_dtype,
    resolve_model_path,
)
from clvray.text.features import (
    REDUCTION_NPZ,
    aggregate_customer_text,
    fit_reduction,
    recency_weights,
    reduce_features,
)
from clvray.text.finetune_data import attach_split, label_reviews, sample_by_hash
from clvray.text.partition import TextInputError
from clvray.text.tokens import tokenize_table

CUTOFF = pd.Timestamp("2023-06-01", tz="UTC")
LATE_TEXT = "zzlate review written after the cutoff"


# --- data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_data() -> dict[str, pd.DataFrame]:
    """~300 synthetic reviews of 160 customers, plus distinctive reviews at and after the cutoff.

    Customers are split 60/20/20 by index; `churned` is 1 for every second customer.
    """
    chunk = generate_chunk(0, SyntheticSection(n_customers=160, customers_per_task=160))
    reviews = chunk["reviews"].copy()
    ids = chunk["truth"]["customer_id"].tolist()
    late = pd.DataFrame(
        {
            "customer_id": ids[:20],
            "review_id": [f"LATE-{i}" for i in range(20)],
            "text": LATE_TEXT,
            "rating": 5,
            "order_id": None,
            "product_id": None,
            # One exactly at the cutoff: `ts < cutoff` excludes it too.
            "ts": [CUTOFF] + [CUTOFF + pd.Timedelta(days=i) for i in range(1, 20)],
        }
    )
    reviews = pd.concat([reviews, late], ignore_index=True)
    split = np.array(["train", "train", "train", "valid", "test"])[np.arange(len(ids)) % 5]
    customers = pd.DataFrame(
        {"customer_id": ids, "split": split, "churned": np.arange(len(ids)) % 2, "other": 1.0}
    )
    return {"reviews": reviews, "customers": customers}


def _read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _ds(df: pd.DataFrame, blocks: int):
    import ray.data

    # One block per chunk (override_num_blocks breaks with pandas 3; a repartition costs a stage).
    return ray.data.from_pandas(
        [df.iloc[rows] for rows in np.array_split(np.arange(len(df)), blocks) if len(rows)]
    )


def _text_cfg(model: str, **finetune) -> TextSection:
    cfg = TextSection(model=model, max_length_tokens=32, num_partitions=2)
    cfg.finetune = cfg.finetune.model_copy(
        update={"cpus_per_worker": 0.5, "batch_size": 16, **finetune}
    )
    cfg.embed = cfg.embed.model_copy(
        update={"batch_size": 16, "tokenize_batch_size": 64, "cpus_per_actor": 0.5}
    )
    return cfg


# --- encoder: loading, devices, tokenization (no Ray) ------------------------------------------------


def test_resolve_model_path_kinds(tiny_encoder, tmp_path):
    assert resolve_model_path(tiny_encoder) == os.path.abspath(tiny_encoder)
    packaged = resolve_model_path("packaged:all-MiniLM-L6-v2")
    assert os.path.isfile(os.path.join(packaged, "config.json"))
    assert os.path.isfile(os.path.join(packaged, "model.safetensors"))
    assert (
        resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown packaged model"):
        resolve_model_path("packaged:bert-huge")


def test_resolve_model_path_s3_downloads_once_per_content(tiny_encoder, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        storage = Storage(endpoint_url=endpoint)
        storage.upload_dir(tiny_encoder, "s3://models/tiny")

        first = resolve_model_path("s3://models/tiny", storage)
        assert first.startswith(str(tmp_path / "clvray-models"))
        assert load_encoder(first)[1].config.hidden_size == 32
        marker = os.path.join(first, "marker")
        open(marker, "w").close()
        assert resolve_model_path("s3://models/tiny", storage) == first  # cached, not fetched again
        assert os.path.exists(marker)
        storage.write_text("s3://models/tiny/README.md", "retrained")  # new content, new copy
        second = resolve_model_path("s3://models/tiny", storage)
        assert second != first and os.path.isfile(os.path.join(second, "README.md"))
    finally:
        server.stop()


def test_tiny_encoder_is_a_real_bert_with_the_synthetic_vocabulary(tiny_encoder):
    tokenizer, encoder = load_encoder(tiny_encoder)
    ids = tokenizer("great guitar broke")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) == 5
    assert encoder.config.hidden_size == 32 and encoder.config.num_hidden_layers == 2


@pytest.mark.parametrize("kind", ["lists", "arrow", "arrow_slice", "chunked"])
def test_padding_places_every_token_and_nothing_else(kind):
    from clvray.text.tokens import flat_tokens, pad_token_ids, scatter_rows

    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 99, int(n)).tolist() for n in rng.integers(1, 12, 40)]
    arrow = pa.array(seqs, type=pa.list_(pa.int32()))
    given, expected = {
        "lists": (seqs, seqs),
        "arrow": (arrow, seqs),
        "arrow_slice": (arrow[7:], seqs[7:]),  # offsets that index into the parent's values
        "chunked": (pa.chunked_array([arrow[:13], arrow[13:]]), seqs),
    }[kind]
    ids, mask = pad_token_ids(given, pad_id=0)
    assert ids.shape == mask.shape == (len(expected), max(map(len, expected)))
    for row, seq in enumerate(expected):
        assert ids[row, : len(seq)].tolist() == seq and not ids[row, len(seq) :].any()
        assert mask[row].tolist() == [1] * len(seq) + [0] * (ids.shape[1] - len(seq))
    # a chosen set of rows into a fixed (height, width) block: truncated, blank rows attend to
    # one pad token
    values, offsets = flat_tokens(given)
    ids, mask = scatter_rows(values, offsets, np.array([2, 0]), width=4, pad_id=-1, height=3)
    for k, row in enumerate([2, 0]):
        seq = expected[row][:4]
        assert ids[k].tolist() == seq + [-1] * (4 - len(seq))
        assert mask[k].sum() == len(seq)
    assert ids[2].tolist() == [-1] * 4 and mask[2].tolist() == [1, 0, 0, 0]


def test_mean_pooling_ignores_padding(tiny_encoder):
    tokenizer, encoder = load_encoder(tiny_encoder)
    model = TextModel(encoder).eval()
    short, long = "great guitar", "poor cable broke and returned it for a better one"
    seqs = [tokenizer(t)["input_ids"] for t in (short, long)]
    with torch.inference_mode():
        alone, _ = model(*pad_batch([seqs[0]], tokenizer.pad_token_id))
        padded, raw = model(*pad_batch(seqs, tokenizer.pad_token_id))
    assert raw is None  # no head: nothing to score
    assert padded.shape == (2, 32)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


def test_packaged_minilm_embeds_384_dims_and_knows_sentiment():
    loaded = load_text_model(resolve_model_path("packaged:all-MiniLM-L6-v2"))
    assert loaded.head is None
    texts = [
        "great guitar, I love it",
        "excellent guitar, love this one",
        "the cable broke after one day",
    ]
    table = tokenize_table(
        pa.table({"i": [0, 1, 2], "text": texts}),
        resolve_model_path("packaged:all-MiniLM-L6-v2"),
        32,
    )
    order = table["i"].to_pylist()
    with torch.inference_mode():
        pooled, _ = loaded.model(*pad_batch(table["input_ids"], loaded.tokenizer.pad_token_id))
    emb = torch.nn.functional.normalize(pooled, dim=1)[torch.tensor(np.argsort(order))]
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def test_fast_tokenization_matches_transformers_and_sorts_by_length():
    path = resolve_model_path("packaged:all-MiniLM-L6-v2")
    texts = [
        "A much longer review about the amp, its speaker, the watts and the cabinet",
        "",
        "Short one.",
        None,
    ]
    out = tokenize_table(pa.table({"review_id": ["a", "b", "c", "d"], "text": texts}), path, 12)
    assert out["n_tokens"].to_pylist() == sorted(out["n_tokens"].to_pylist())
    tokenizer = load_tokenizer(path)
    expected = tokenizer([t or "" for t in texts], truncation=True, max_length=12)["input_ids"]
    got = dict(zip(out["review_id"].to_pylist(), out["input_ids"].to_pylist(), strict=True))
    assert [got[k] for k in "abcd"] == expected
    assert max(out["n_tokens"].to_pylist()) == 12
    # `truncated` says which reviews lost tokens: independently, the untruncated length
    full = tokenizer([t or "" for t in texts])["input_ids"]
    flags = dict(zip(out["review_id"].to_pylist(), out["truncated"].to_pylist(), strict=True))
    assert [flags[k] for k in "abcd"] == [len(ids) > 12 for ids in full] == [True] + [False] * 3
    # the fallback for models without tokenizer.json flags the same reviews
    from clvray.text.tokens import _HFTokenizer

    ids, slow_flags = _HFTokenizer(path).encode_flagged([t or "" for t in texts], 12)
    assert ids == expected and slow_flags == [flags[k] for k in "abcd"]


def test_device_and_dtype_selection():
    assert pick_device(False).type == "cpu"
    assert pick_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        device = pick_device(True)
        assert device.type == "cuda"
        assert pick_dtype(device) == (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        )
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device(True)


# --- fine-tuning data (row functions without Ray, then the Ray Data build) ---------------------


def _review_table(rows: list[tuple]) -> pa.Table:
    cid, rid, ts, text, rating = zip(*rows, strict=True)
    return pa.table(
        {
            "customer_id": list(cid),
            "review_id": list(rid),
            "ts": pa.array(pd.to_datetime(list(ts), utc=True)),
            "text": list(text),
            "rating": pa.array(list(rating), pa.int8()),
        }
    )


def test_rating_labels_drop_unrated_and_post_cutoff_reviews():
    table = _review_table(
        [
            ("a", "r1", "2023-05-31", "good", 5),
            ("a", "r2", "2023-05-30", "meh", None),
            ("b", "r3", "2023-06-01", "late", 1),
            ("b", "r4", "2023-01-01", None, 1),
        ]
    )
    out = label_reviews(table, CUTOFF, "rating")
    assert out["review_id"].to_pylist() == ["r1", "r4"]
    assert out["label"].to_pylist() == [1.0, -1.0]
    assert out["text"].to_pylist() == ["good", ""]


def test_churn_labels_come_from_train_and_valid_customers_only():
    reviews = label_reviews(
        _review_table(
            [(c, f"r-{c}", "2023-01-01", "x", None) for c in ["tr", "va", "te", "nobody"]]
        ),
        CUTOFF,
        "churn",
    )
    customers = pa.table(
        {
            "customer_id": ["tr", "va", "te"],
            "split": ["train", "valid", "test"],
            "customer_label": pa.array([1.0, 0.0, 1.0], pa.float32()),
        }
    )
    # what Dataset.join(customers, "inner") hands attach_split: the reviews of known customers
    joined = reviews.to_pandas().merge(customers.to_pandas(), on="customer_id", how="inner")
    out = attach_split(pa.Table.from_pandas(joined, preserve_index=False), "churn", "s")
    out = out.to_pandas().set_index("review_id")
    assert sorted(out.index) == ["r-tr", "r-va"]
    assert out.loc["r-tr", "label"] == 1.0 and out.loc["r-tr", "split"] == "train"
    assert out.loc["r-va", "label"] == 0.0 and out.loc["r-va", "split"] == "valid"


def test_hash_sample_is_stable_and_near_the_fraction():
    table = pa.table({"review_id": [f"R{i}" for i in range(4000)]})
    a = sample_by_hash(table, 0.25, "s")
    assert a.equals(sample_by_hash(table, 0.25, "s"))
    assert 900 < a.num_rows < 1100
    assert not a.equals(sample_by_hash(table, 0.25, "other salt"))


@pytest.fixture(scope="module")
def churn_sets(ray_local, text_data, tiny_encoder) -> dict:
    """The fine-tuning sets for the churn target, capped at 120 reviews (shared by the data
    test and the training run, so the suite builds them once)."""
    from clvray.text.finetune_data import build_finetune_datasets

    cfg = _text_cfg(tiny_encoder, target="churn", max_reviews=120)
    reviews, customers = _ds(text_data["reviews"], 3), _ds(text_data["customers"], 2)
    return {
        "cfg": cfg,
        "datasets": build_finetune_datasets(reviews, customers, cfg, CUTOFF, Storage()),
    }


def test_finetune_data_respects_cutoff_split_labels_and_cap(churn_sets, text_data):
    reviews, customers = text_data["reviews"], text_data["customers"]
    train = churn_sets["datasets"]["train"].to_pandas()
    valid = churn_sets["datasets"]["valid"].to_pandas()
    seen = pd.concat([train, valid])
    split_of = customers.set_index("customer_id")["split"]
    churned = customers.set_index("customer_id")["churned"]
    customer_of = reviews.set_index("review_id")["customer_id"]
    assert len(seen) == 120  # the cap, exactly
    assert not seen["review_id"].str.startswith("LATE").any()
    assert (reviews.set_index("review_id").loc[seen["review_id"], "ts"] < CUTOFF).all()
    assert (split_of[customer_of[train["review_id"]]] == "train").all()
    assert (split_of[customer_of[valid["review_id"]]] == "valid").all()  # test customers: never
    assert len(valid) > 0
    np.testing.assert_array_equal(
        seen["label"].to_numpy(dtype=np.float64), churned[customer_of[seen["review_id"]]].to_numpy()
    )
    assert all(
        len(ids) == n <= 32 for ids, n in zip(seen["input_ids"], seen["n_tokens"], strict=True)
    )


def test_finetune_rows_come_in_one_order_whatever_the_blocks(churn_sets, text_data, tiny_encoder):
    """The training order (`ORDER`: random chunks by the review's stable draw, each by length)
    depends on the reviews alone: other input blocks give the same rows in the same order, so
    the same config and seed fine-tune the same encoder."""
    from clvray.text.finetune_data import ORDER, build_finetune_datasets

    other = build_finetune_datasets(
        _ds(text_data["reviews"], 1), _ds(text_data["customers"], 5), churn_sets["cfg"],
        CUTOFF, Storage(),
    )  # fmt: skip
    for split in ("train", "valid"):
        a = churn_sets["datasets"][split].to_pandas()
        b = other[split].to_pandas()
        assert a["review_id"].tolist() == b["review_id"].tolist()
        assert a["review_id"].tolist() == a.sort_values(ORDER)["review_id"].tolist()
    train = churn_sets["datasets"]["train"].to_pandas()
    assert train["_chunk"].is_monotonic_increasing
    for _, chunk in train.groupby("_chunk"):  # each chunk by length
        assert chunk["n_tokens"].is_monotonic_increasing


def test_finetune_data_fails_at_the_door_on_a_missing_column(ray_local, text_data, tiny_encoder):
    from clvray.text.finetune_data import build_finetune_datasets

    customers = text_data["customers"].drop(columns=["churned"])
    with pytest.raises(
        TextInputError, match=r"customer table lacks required column\(s\) \['churned'\]"
    ):
        build_finetune_datasets(
            _ds(text_data["reviews"], 1),
            _ds(customers, 1),
            _text_cfg(tiny_encoder, target="churn"),
            CUTOFF,
        )


# --- fine-tuning with Ray Train -------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(churn_sets, tiny_encoder, tmp_path_factory) -> dict:
    """One fine-tuning run (churn target, 2 DDP workers, 2 epochs) whose rank-0 worker dies
    in epoch 1 of the first attempt only, after epoch 0's checkpoint is committed."""
    from clvray.text.finetune import finetune_on_datasets

    tmp = tmp_path_factory.mktemp("finetune")
    marker, epoch_log = str(tmp / "killed-once"), str(tmp / "epochs.log")

    def die_once_at_epoch_1(epoch: int, rank: int) -> None:
        with open(epoch_log, "a") as f:
            f.write(f"{rank} {epoch}\n")
        if epoch == 1 and rank == 0 and not os.path.exists(marker):
            import ray.train

            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
            Path(marker).touch()
            os._exit(1)

    name = f"ft-{uuid.uuid4().hex[:8]}"
    cfg = churn_sets["cfg"].model_copy(deep=True)
    cfg.finetune = cfg.finetune.model_copy(
        update={"epochs": 2, "num_workers": 2, "max_failures": 1, "learning_rate": 1e-3}
    )
    uri = finetune_on_datasets(
        churn_sets["datasets"],
        cfg,
        CUTOFF,
        str(tmp / "runs"),
        Storage(),
        name,
        on_epoch_start=die_once_at_epoch_1,
    )
    return {
        "uri": uri,
        "run_dir": str(tmp / "runs" / name),
        "marker": marker,
        "epoch_log": epoch_log,
    }


def test_finetune_reports_validation_loss_and_saves_a_loadable_model(finetuned, churn_sets):
    meta = _read_json(os.path.join(finetuned["uri"], META_FILE))
    assert [h["epoch"] for h in meta["history"]] == [0, 1]
    assert all(np.isfinite(h["val_loss"]) and np.isfinite(h["train_loss"]) for h in meta["history"])
    assert meta["head"] == {"target": "churn", "score": "churn_probability", "hidden_size": 32}
    assert meta["cutoff"] == CUTOFF.isoformat()
    assert meta["n_train_reviews"] == churn_sets["datasets"]["train"].count()
    assert meta["n_valid_reviews"] == churn_sets["datasets"]["valid"].count() > 0
    assert {"epoch-0000", "epoch-0001"} <= set(os.listdir(finetuned["run_dir"]))
    assert os.path.isfile(os.path.join(finetuned["run_dir"], "epoch-0001", "train_state.pt"))

    loaded = load_text_model(finetuned["uri"])
    assert loaded.head is not None and loaded.head.target == "churn"
    seqs = [loaded.tokenizer(t)["input_ids"] for t in ["great guitar love", "poor cable broke"]]
    with torch.inference_mode():
        pooled, raw = loaded.model(*pad_batch(seqs, loaded.tokenizer.pad_token_id))
    scores = loaded.head.to_score(raw)
    assert pooled.shape == (2, 32)
    assert bool(((scores > 0) & (scores < 1)).all())
    # The weights moved: the saved encoder is not the one training started from.
    base = load_text_model(churn_sets["cfg"].model)
    assert not torch.equal(
        base.model.encoder.embeddings.word_embeddings.weight,
        loaded.model.encoder.embeddings.word_embeddings.weight,
    )


def test_finetune_resumes_from_the_last_checkpoint_after_a_worker_dies(finetuned):
    assert os.path.exists(finetuned["marker"])  # the worker did die
    rank0 = [
        int(line.split()[1])
        for line in Path(finetuned["epoch_log"]).read_text().splitlines()
        if line.split()[0] == "0"
    ]
    assert rank0 == [0, 1, 1]  # epoch 0 once, epoch 1 again after the restart, never 0 again
    meta = _read_json(os.path.join(finetuned["uri"], META_FILE))
    assert meta["start_epoch"] == 1
    assert [h["epoch"] for h in meta["history"]] == [0, 1]


# --- embedding --------------------------------------------------------------------------------------


def test_embed_two_actors_embed_every_review_before_the_cutoff_exactly_once(
    ray_local, text_data, tiny_encoder, tmp_path
):
    import ray

    from clvray.text.embed import embed_reviews

    loads = tmp_path / "loads"
    loads.mkdir()

    def counting_loader(path: str):
        (loads / f"{os.getpid()}-{uuid.uuid4().hex[:6]}").touch()
        return load_text_model(path)

    reviews = text_data["reviews"]
    reviews = pd.concat([reviews.head(150), reviews[reviews["review_id"].str.startswith("LATE")]])
    expected = reviews.loc[reviews["ts"] < CUTOFF, "review_id"]
    cfg = _text_cfg(tiny_encoder)
    cfg.embed = cfg.embed.model_copy(
        update={"min_actors": 2, "max_actors": 2, "batch_size": 16, "dtype": "float16"}
    )
    embedded = embed_reviews(
        _ds(reviews, 4), tiny_encoder, cfg, cutoff=CUTOFF, loader=counting_loader
    )
    refs = embedded.to_arrow_refs()
    table = pa.concat_tables(ray.get(refs))
    # Tokenization stays a CPU-task operator ahead of the actors, not fused into them.
    stats = embedded.stats()
    assert "MapBatches(tokenize_reviews)" in stats and "tokenize_reviews)->" not in stats
    assert table.num_rows == len(expected) > 3 * cfg.embed.batch_size
    assert sorted(table["review_id"].to_pylist()) == sorted(
        expected
    )  # none lost, none twice, none late
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert table["score"].null_count == table.num_rows  # a pretrained encoder has no head
    assert len(os.listdir(loads)) == 2  # the model is loaded once per actor, not per batch
    ts = dict(zip(reviews["review_id"], reviews["ts"], strict=True))
    assert all(
        ts[r] == t
        for r, t in zip(table["review_id"].to_pylist(), table["ts"].to_pandas(), strict=True)
    )


# --- text features ------------------------------------------------------------------------------------


def test_aggregates_hand_checked():
    cutoff = pd.Timestamp("2024-01-01", tz="UTC")
    reviews = pd.DataFrame(
        {
            "customer_id": ["b", "a", "a", "a"],
            "ts": pd.to_datetime(
                ["2023-12-01", "2023-12-22", "2023-10-03", "2024-02-01"], utc=True
            ),
            "embedding": [
                np.array([1.0, 1.0]),
                np.array([2.0, 0.0]),
                np.array([0.0, 4.0]),
                np.array([100.0, 100.0]),
            ],
            "score": [np.nan, 4.0, 2.0, 1.0],
        }
    )
    out = aggregate_customer_text(reviews, cutoff, half_life_days=10.0).set_index("customer_id")
    a, b = out.loc["a"], out.loc["b"]
    assert a["txt_n_reviews"] == 2  # the 2024-02-01 review is after the cutoff
    np.testing.assert_allclose(a["emb_mean"], [1.0, 2.0])
    # Ages 10 and 90 days with a 10-day half-life: weights 0.5 and 0.5 ** 9.
    w1, w2 = 0.5, 0.5**9
    np.testing.assert_allclose(a["emb_rw"], [(w1 * 2) / (w1 + w2), (w2 * 4) / (w1 + w2)], rtol=1e-6)
    assert a["txt_score_mean"] == 3.0 and a["txt_score_min"] == 2.0
    assert (
        b["txt_n_reviews"] == 1 and np.isnan(b["txt_score_mean"]) and np.isnan(b["txt_score_min"])
    )
    np.testing.assert_allclose(
        recency_weights(pd.Series(pd.to_datetime(["2023-12-22"], utc=True)), cutoff, 10.0), [0.5]
    )


def test_pca_reduction_is_deterministic_and_keeps_its_width():
    x = np.random.default_rng(0).normal(size=(40, 6)) * np.array([5, 3, 1, 0.5, 0.1, 0.1])
    r = fit_reduction(x, "pca", 3)
    assert r.components.shape == (3, 6)
    np.testing.assert_allclose(np.abs(r.components[0]).argmax(), 0)  # the widest axis first
    np.testing.assert_array_equal(fit_reduction(x, "pca", 3).components, r.components)
    few = fit_reduction(x[:2], "pca", 4)  # rank 1 sample: still 4 components, zero-padded
    assert few.components.shape == (4, 6) and not few.components[2:].any()
    aggs = pd.DataFrame(
        {
            "customer_id": ["a"],
            "txt_n_reviews": [1],
            "txt_score_mean": [1.0],
            "txt_score_min": [1.0],
            "emb_mean": [x[0]],
            "emb_rw": [x[1]],
        }
    )
    flat = reduce_features(aggs, r)
    assert [c for c in flat.columns if c.startswith("txt_mean_")] == [
        "txt_mean_0",
        "txt_mean_1",
        "txt_mean_2",
    ]
    np.testing.assert_allclose(
        flat[["txt_rw_0", "txt_rw_1", "txt_rw_2"]].to_numpy()[0],
        (x[1] - x.mean(0)) @ r.components.T,
        rtol=1e-5,
    )


def _embeddings(customers: pd.DataFrame, bump_non_train: float = 0.0) -> pd.DataFrame:
    """Two reviews per customer with known 4-d embeddings, and one review after the cutoff."""
    rng = np.random.default_rng(3)
    rows = []
    for cid, split in zip(customers["customer_id"], customers["split"], strict=True):
        for k, days in enumerate([5, 40]):
            e = rng.normal(size=4) * np.array([3, 2, 1, 0.5])
            if split != "train":
                e = e + bump_non_train
            rows.append((cid, f"{cid}-{k}", CUTOFF - pd.Timedelta(days=days), e.tolist(), 3.0 + k))
    first = customers["customer_id"].iloc[0]
    rows.append((first, "LATE", CUTOFF + pd.Timedelta(days=1), [99.0] * 4, 1.0))
    return pd.DataFrame(rows, columns=["customer_id", "review_id", "ts", "embedding", "score"])


def test_reduction_fit_ignores_valid_and_test_customers(text_data):
    from clvray.text.features import aggregate_partition, embedding_rows, train_sample

    customers = text_data["customers"].head(30)
    fits = []
    for bump in [0.0, 7.0]:
        reviews = embedding_rows(
            pa.Table.from_pandas(_embeddings(customers, bump), preserve_index=False), CUTOFF
        )
        split = pa.Table.from_pandas(customers[["customer_id", "split"]], preserve_index=False)
        aggs = aggregate_partition(reviews, CUTOFF, 30.0)
        aggs = pa.Table.from_pandas(  # the split, as the stage's Dataset.join adds it
            aggs.to_pandas().merge(split.to_pandas(), on="customer_id", how="left"),
            preserve_index=False,
        )
        sample = train_sample(aggs, 1.0)
        assert sorted(sample["customer_id"].to_pylist()) == sorted(
            customers.loc[customers["split"] == "train", "customer_id"]
        )
        fits.append(
            fit_reduction(np.stack(sample["emb_mean"].to_numpy(zero_copy_only=False)), "pca", 2)
        )
    np.testing.assert_array_equal(fits[0].components, fits[1].components)
    np.testing.assert_array_equal(fits[0].center, fits[1].center)


def test_reduction_round_trips_through_storage(tmp_path):
    from clvray.text.features import load_reduction, save_reduction

    r = fit_reduction(np.random.default_rng(1).normal(size=(20, 5)), "random", 3, seed=4)
    save_reduction(r, Storage(), str(tmp_path / "red"))
    back = load_reduction(Storage(), str(tmp_path / "red"))
    assert back.method == "random" and back.n_fit == 20
    np.testing.assert_array_equal(back.components, r.components)
    assert _read_json(str(tmp_path / "red" / "reduction.json"))["columns"][-1] == "txt_rw_2"


def test_text_features_end_to_end(ray_local, text_data, tmp_path):
    from clvray.text.features import build_text_features

    customers = text_data["customers"].head(40)
    cfg = TextSection(num_partitions=2)
    cfg.embed = cfg.embed.model_copy(
        update={"reduce": "pca", "reduce_dim": 2, "recency_half_life_days": 30.0}
    )
    out_uri = str(tmp_path / "text")
    feats = build_text_features(
        _ds(_embeddings(customers), 2), _ds(customers, 2), CUTOFF, cfg, Storage(), out_uri
    )
    f = feats.to_pandas().set_index("customer_id").sort_index()
    assert list(f.columns) == [
        "txt_n_reviews",
        "txt_score_mean",
        "txt_score_min",
        "txt_mean_0",
        "txt_mean_1",
        "txt_rw_0",
        "txt_rw_1",
    ]
    assert sorted(f.index) == sorted(customers["customer_id"])
    assert (f["txt_n_reviews"] == 2).all()  # the LATE review is not counted
    assert (f["txt_score_mean"] == 3.5).all() and (f["txt_score_min"] == 3.0).all()
    meta = _read_json(join(out_uri, "reduction.json"))
    n_train = int((customers["split"] == "train").sum())
    assert meta["n_fit_customers"] == n_train and meta["method"] == "pca"  # train customers only
    # The features are the saved map applied to the hand-computable aggregates.
    emb = _embeddings(customers)
    emb = emb[emb["ts"] < CUTOFF]
    mean = np.stack(
        emb.groupby("customer_id")["embedding"]
        .apply(lambda v: np.mean(np.stack(v), axis=0))
        .loc[f.index]
    )
    red = np.load(join(out_uri, REDUCTION_NPZ))
    np.testing.assert_allclose(
        f[["txt_mean_0", "txt_mean_1"]].to_numpy(
            dtype=np.float64
        ),  # Ray hands arrow-backed columns
        (mean - red["center"]) @ red["components"].T,
        rtol=1e-4,
        atol=1e-4,
    )


def test_a_reviews_embedding_does_not_depend_on_its_batch():
    """Ray's block layout decides which reviews share an encoder call; with fixed call shapes
    (the default) each review's embedding and score are bitwise those of the review alone."""
    import datetime as dt

    from clvray.text.embed import ReviewEncoder

    path = resolve_model_path("packaged:all-MiniLM-L6-v2")
    rng = np.random.default_rng(0)
    words = [
        "great",
        "guitar",
        "cable",
        "broke",
        "amp",
        "loud",
        "sound",
        "cheap",
        "strings",
        "love",
        "return",
        "tuner",
    ]
    n = 40
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(n)]
    ts = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
    table = tokenize_table(
        pa.table(
            {
                "customer_id": [f"c{i}" for i in range(n)],
                "review_id": [f"r{i}" for i in range(n)],
                "ts": [ts] * n,
                "text": texts,
            }
        ),
        path,
        64,
    )
    encoder = ReviewEncoder(path, fixed_shapes=(8, 16))

    def embed(parts) -> dict[str, np.ndarray]:
        out = {}
        for part in parts:
            t = encoder(part)
            emb = np.asarray(t["embedding"].combine_chunks().flatten()).reshape(len(t), -1)
            out.update(zip(t["review_id"].to_pylist(), emb, strict=True))
        return out

    whole = embed([table])
    shuffled = table.take(rng.permutation(n))
    pieces = embed([shuffled.slice(0, 7), shuffled.slice(7, 20), shuffled.slice(27)])
    alone = embed([table.slice(i, 1) for i in (0, 13, n - 1)])
    assert set(whole) == set(pieces) == {f"r{i}" for i in range(n)}
    for key in whole:
        assert np.array_equal(whole[key], pieces[key]), key
    for key, value in alone.items():
        assert np.array_equal(whole[key], value), key
    # the same model as one padded call, up to float rounding
    plain = ReviewEncoder(path, fixed_shapes=None)
    t = plain(table)
    ref = np.asarray(t["embedding"].combine_chunks().flatten()).reshape(n, -1)
    for key, row in zip(t["review_id"].to_pylist(), ref, strict=True):
        np.testing.assert_allclose(whole[key], row, atol=1e-5)

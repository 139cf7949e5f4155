"""Ray integration: a run with 5% of rows corrupted, a planted secret, and training that does
not depend on the order in which Ray Data delivers rows. One small data set each."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from clvray.config import load_config
from clvray.features import customer_features, to_events
from clvray.ingest import ingest
from clvray.storage import Storage

N_ROWS = 2000
CORRUPT_EVERY = 20  # 5%


def _clean_transactions(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2022-01-01", tz="UTC")
    seconds = rng.integers(0, 2 * 365 * 86400, N_ROWS)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in rng.integers(0, 300, N_ROWS)],
            "order_id": [f"o{i}" for i in range(N_ROWS)],
            "ts": start + pd.to_timedelta(seconds, unit="s"),
            "amount": np.round(rng.gamma(2.0, 20.0, N_ROWS) * rng.choice([1, 1, 1, -1], N_ROWS), 2),
        }
    )


# Mixed corruptions: each turns a clean CSV line into a line the contract must reject.
CORRUPTIONS = [
    lambda c, o, t, a: f"{c},{o},not a date,{a}",
    lambda c, o, t, a: f"{c},{o},2100-01-01T00:00:00Z,{a}",
    lambda c, o, t, a: f"{c},{o},{t},abc",
    lambda c, o, t, a: f"{c},{o},{t},1e300",
    lambda c, o, t, a: f"  ,{o},{t},{a}",
    lambda c, o, t, a: f"{c},{o},{t}",  # a short row
    lambda c, o, t, a: f"{c},{o},{t},{a},surplus",  # a long row
    lambda c, o, t, a: f"{c},{o},1969-07-20,{a}",
]


def _write_corrupted(clean: pd.DataFrame, folder) -> set[str]:
    """Three CSV files (one gzipped) of `clean`, every 20th line corrupted; returns the
    corrupted order ids."""
    folder.mkdir(parents=True)
    lines, corrupted = [], set()
    for i, (c, o, t, a) in enumerate(clean.itertuples(index=False)):
        t = t.isoformat()
        if i % CORRUPT_EVERY == 7:
            lines.append(CORRUPTIONS[(i // CORRUPT_EVERY) % len(CORRUPTIONS)](c, o, t, a))
            corrupted.add(o)
        else:
            lines.append(f"{c},{o},{t},{a}")
    header = "customer_id,order_id,ts,amount\n"
    thirds = np.array_split(np.arange(len(lines)), 3)
    for k, idx in enumerate(thirds):
        text = header + "\n".join(lines[j] for j in idx) + "\n"
        if k == 2:
            (folder / f"part-{k}.csv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (folder / f"part-{k}.csv").write_text(text)
    return corrupted


def _read(folder) -> pd.DataFrame:
    return pq.read_table(folder).to_pandas()


def _ingest(tmp_path, name: str, tx_dir, *extra: str) -> tuple[dict, str]:
    cfg = load_config(
        None,
        [
            "data.source=contract_parquet",
            f"data.transactions={tx_dir}",
            "ingest.max_reject_share=0.1",
            "ingest.max_ts=2030-01-01",
            "features.num_partitions=2",
            *extra,
        ],
    )
    run_dir = str(tmp_path / name)
    return ingest(cfg, Storage(), run_dir)["transactions"], run_dir


def test_corrupted_rows_are_exactly_the_rejects_and_features_match_clean(ray_local, tmp_path):
    clean = _clean_transactions()
    corrupted = _write_corrupted(clean, tmp_path / "in")
    counts, run_dir = _ingest(tmp_path, "run-a", tmp_path / "in", "ingest.block_rows=300")
    assert counts["rows_in"] == N_ROWS == counts["rows_accepted"] + counts["rows_rejected"]
    assert counts["rows_rejected"] == len(corrupted) == N_ROWS // CORRUPT_EVERY
    rejects = _read(f"{run_dir}/rejects/transactions")
    rejected_orders = {
        o for row in rejects["row"] for o in [json.loads(row).get("order_id")] if o
    } | {
        json.loads(row)["text"].split(",")[1] for row in rejects["row"] if "text" in json.loads(row)
    }
    assert rejected_orders == corrupted  # every corrupted row, and nothing else

    accepted = (
        _read(f"{run_dir}/ingest/transactions").sort_values("order_id").reset_index(drop=True)
    )
    expected = (
        clean[~clean["order_id"].isin(corrupted)].sort_values("order_id").reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(accepted, expected, check_dtype=False)
    assert accepted["ts"].max() < pd.Timestamp("2024-01-02", tz="UTC")  # 2100 never got in
    assert counts["ts_max"] == expected["ts"].max().isoformat()

    cutoff = pd.Timestamp("2023-09-01", tz="UTC")
    got = customer_features(to_events(accepted, "t"), cutoff, 90).sort_values("customer_id")
    want = customer_features(to_events(expected, "t"), cutoff, 90).sort_values("customer_id")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))

    # The same input in other blocks gives the same accepted rows.
    counts_b, run_b = _ingest(tmp_path, "run-b", tmp_path / "in", "ingest.block_rows=100000")
    assert counts_b == counts
    again = _read(f"{run_b}/ingest/transactions").sort_values("order_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(again, accepted)


SECRET = "planted-secret-7f3a9c"


def test_no_secret_raw_id_or_email_in_any_output(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("CLVRAY_TEST_ID_KEY", SECRET)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "tx.csv").write_text(
        "customer_id,order_id,ts,amount\n"
        "alice.smith,o1,2023-01-05,10\nalice.smith,o2,2023-02-05,20\nbob.jones,o3,2023-01-09,5\n"
        "bob.jones,o4,garbage,5\n"
    )
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    (reviews / "r.jsonl").write_text(
        json.dumps({"customer_id": "alice.smith", "review_id": "r1", "ts": "2023-01-06",
                    "text": "Great! mail me at alice.smith@example.com or +44 20 7946 0958",
                    "rating": 5}) + "\n"
        + json.dumps({"customer_id": "bob.jones", "review_id": "r2", "ts": "2023-01-10",
                      "text": "see https://bob.example.net/me", "rating": 9}) + "\n"
    )  # fmt: skip
    cfg = load_config(
        None,
        [
            "data.source=contract_parquet",
            f"data.transactions={folder}",
            f"data.reviews={reviews}",
            "ingest.max_reject_share=0.9",
            "ingest.max_ts=2030-01-01",
            "features.num_partitions=2",
            "privacy.pseudonymize_ids=true",
            "privacy.id_key_env=CLVRAY_TEST_ID_KEY",
        ],
    )
    run_dir = tmp_path / "run"
    counts = ingest(cfg, Storage(), str(run_dir))
    assert counts["transactions"]["rows_accepted"] == 3
    accepted = _read(run_dir / "ingest" / "transactions")
    assert accepted["customer_id"].nunique() == 2
    forbidden = [SECRET, "alice.smith", "bob.jones", "example.com", "7946", "bob.example"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if path.suffix == ".parquet":
            text += json.dumps(pq.read_table(path).to_pylist(), default=str)
        for word in forbidden:
            assert word not in text, f"{word!r} found in {path}"


def test_without_the_key_pseudonymization_stops_before_work(tmp_path, monkeypatch):
    monkeypatch.delenv("CLVRAY_UNSET_KEY", raising=False)
    cfg = load_config(
        None,
        ["privacy.pseudonymize_ids=true", "privacy.id_key_env=CLVRAY_UNSET_KEY",
         f"data.transactions={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(Exception, match="CLVRAY_UNSET_KEY"):
        ingest(cfg, Storage(), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _customers(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    value = np.exp(x[:, 0]) * 10 + rng.gamma(1.0, 2.0, n)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:04d}" for i in range(n)],
            "split": rng.choice(["train", "valid", "test"], n, p=[0.7, 0.15, 0.15]),
            "f0": x[:, 0],
            "f1": x[:, 1],
            "f2": x[:, 2],
            "future_value": value,
            "churned": (x[:, 1] + rng.normal(size=n) > 0).astype(np.int64),
        }
    )


def test_training_does_not_depend_on_row_order_blocks_or_workers(ray_local, tmp_path):
    """The same config and seed give the same boosters, value for value, whatever the row
    order, the blocks and the number of Ray Train workers, and the same as `fit_local` in one
    process. With a sample of 3,000 customers the edges, base scores and quantile booster come
    from a part of the customers, and the row draw (subsample 0.8) is on."""
    import ray.data
    import xgboost as xgb

    from clvray.train import Boosters, feature_matrix, fit_local, model_params, train_models

    # Enough distinct values that XGBoost's sketch would approximate; an odd number of train
    # and valid customers, of which Ray Train's default split would drop one for 2 workers.
    df = _customers(20_003)
    n_train, n_valid = (df["split"] == "train").sum(), (df["split"] == "valid").sum()
    assert (n_train + n_valid) % 2 == 1
    features = ["f0", "f1", "f2"]
    cfg = load_config(None, ["train.num_boost_round=15", "train.early_stopping_rounds=5",
                             "train.subsample=0.8", "train.sample_customers=3000"]).train  # fmt: skip
    preds, raw = [], []
    runs = [(1, 1, 1, 1.0), (2, 5, 2, 0.5)]  # shuffle seed, blocks, workers, CPUs per worker
    for k, (seed, blocks, workers, cpus) in enumerate(runs):
        shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        ds = ray.data.from_items(shuffled.to_dict("records"), override_num_blocks=blocks)
        run_dir = str(tmp_path / f"run-{k}")
        c = cfg.model_copy(update={"num_workers": workers, "cpus_per_worker": cpus})
        trained = train_models(ds, features, c, Storage(), run_dir, "det", seed=0)
        boosters = Boosters(trained.uri, Storage())
        assert boosters.meta["sample_customers"]["share"] < 1.0
        for name in ("value", "churn"):
            got = boosters.meta["results"][name]
            assert (got["train_rows"], got["valid_rows"]) == (n_train, n_valid), name
        preds.append(boosters.predict(df))
        raw.append(
            {n: b.predict(feature_matrix(df, features, {})) for n, b in boosters.models.items()}
        )
    for name in preds[0]:
        np.testing.assert_array_equal(preds[0][name], preds[1][name], err_msg=name)
    # one process, the same recipe: the same boosters
    params = model_params(cfg, seed=0)
    params = {n: p for n, p in params.items() if n in raw[0]}
    plan = {"features": features, "categories": {}, "subsample": 0.8, "seed": 0,
            "num_boost_round": 15, "early_stopping_rounds": 5}  # fmt: skip
    local, _ = fit_local(df[df["split"] != "test"], plan, params, cfg.sample_customers)
    for name, booster in local.items():
        got = booster.predict(xgb.DMatrix(df[features]))
        np.testing.assert_array_equal(got, raw[0][name], err_msg=name)
        np.testing.assert_array_equal(got, raw[1][name], err_msg=name)


def test_corrupt_file_found_inside_a_task_stops_naming_it_or_is_skipped(ray_local, tmp_path):
    from clvray.io import BadFileError

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text("customer_id,order_id,ts,amount\nc1,o1,2023-01-05,1\n")
    data = gzip.compress(
        ("customer_id,order_id,ts,amount\n" + "c2,o2,2023-01-06,2\n" * 300).encode()
    )
    bad = folder / "b.csv.gz"
    bad.write_bytes(data[: len(data) // 2])  # truncated: only reading the whole file finds it
    with pytest.raises(BadFileError, match=rf"{bad}: cannot be read .*on_bad_file: skip"):
        _ingest(tmp_path, "run-stop", folder)
    counts, run_dir = _ingest(tmp_path, "run-skip", folder, "ingest.on_bad_file=skip",
                              "ingest.max_reject_share=0.5")  # fmt: skip
    assert (counts["rows_in"], counts["rows_accepted"], counts["rows_rejected"]) == (2, 1, 1)
    assert counts["files_skipped"] == 1

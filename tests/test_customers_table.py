"""The optional customers table: ingest with rejects, Online Retail's derived Country, the
`cat_*` features it feeds, and XGBoost's native categorical splits fitted on train only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from clvray.adapters import online_retail_to_transactions
from clvray.config import TrainSection, load_config
from clvray.contract import TRANSACTIONS as TRANSACTIONS_SCHEMA
from clvray.contract import ContractError, validate_transactions
from clvray.features import FEATURES, build_features, categorical_columns, categorical_name
from clvray.ingest import ingest, ingest_customers, open_customers
from clvray.score import top_contributions
from clvray.storage import Storage
from clvray.train import Boosters, feature_frame, train_models

CUTOFF = pd.Timestamp("2023-06-01", tz="UTC")

TRANSACTIONS = [
    ("c1", "o1", "2023-01-05", 10.0),
    ("c1", "o2", "2023-03-05", 20.0),
    ("c2", "o3", "2023-02-01", 5.0),
    ("c3", "o4", "2023-02-11", 7.0),  # c3 is not in the customers table
    ("c1", "o5", "2023-07-01", 30.0),  # after the cutoff: a label
]
CUSTOMERS_CSV = """customer_id,Country,Segment,Zip
c1,UK,gold,02139
c2,FR,,75001
,DE,silver,10115
c1,US,bronze,10001
"""


def _read(folder: str) -> pd.DataFrame:
    """A stage output read without Ray: the checks stay cheap."""
    return pq.read_table(folder).to_pandas()


def _config(*overrides: str):
    return load_config(
        None,
        ["ingest.max_reject_share=0.9", "features.num_partitions=2", *overrides],
    )


@pytest.fixture(scope="module")
def customers_run(ray_local, tmp_path_factory):
    """One ingest of a customers CSV with a missing and a duplicate id (no other table, so
    the test pays for the customers table's Ray passes only)."""
    root = tmp_path_factory.mktemp("customers")
    (root / "customers.csv").write_text(CUSTOMERS_CSV)
    cfg = _config("data.source=contract_parquet", f"data.customers={root / 'customers.csv'}")
    run_dir = str(root / "run")
    counts = ingest(cfg, Storage(), run_dir)
    return cfg, run_dir, counts


def test_customers_ingest_rejects_missing_and_duplicate_ids(customers_run):
    _, run_dir, counts = customers_run
    c = counts["customers"]
    assert (c["rows_in"], c["rows_accepted"], c["rows_rejected"]) == (4, 2, 2)
    assert c["rejects_by_reason"] == {
        "customer_id: missing or empty": 1,
        "customer_id: duplicate": 1,
    }
    accepted = _read(f"{run_dir}/ingest/customers")
    accepted = accepted.set_index("customer_id").sort_index()
    assert list(accepted.columns) == ["Country", "Segment", "Zip"]
    # Of the two c1 rows the one whose raw text sorts first ("UK" < "US") is kept, on any run.
    assert accepted.loc["c1"].tolist() == ["UK", "gold", "02139"]  # the zip keeps its zero
    assert accepted.loc["c2", "Country"] == "FR" and pd.isna(accepted.loc["c2", "Segment"])
    rejects = _read(f"{run_dir}/rejects/customers")
    dup = rejects[rejects["reason"] == "customer_id: duplicate"]["row"].tolist()
    assert len(dup) == 1 and json.loads(dup[0])["Country"] == "US"


def test_build_features_puts_attributes_on_the_right_customers(customers_run):
    cfg, run_dir, _ = customers_run
    tx = pd.DataFrame(TRANSACTIONS, columns=["customer_id", "order_id", "ts", "amount"])
    tx["ts"] = pd.to_datetime(tx["ts"], utc=True)
    (Path(run_dir) / "ingest" / "transactions").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pandas(tx, schema=TRANSACTIONS_SCHEMA, preserve_index=False),
        Path(run_dir) / "ingest" / "transactions" / "part-0.parquet",
    )
    build_features(cfg, Storage(), run_dir, CUTOFF)
    df = _read(f"{run_dir}/features/customers")
    df = df.set_index("customer_id").sort_index()
    assert categorical_columns(list(df.columns)) == ["cat_country", "cat_segment", "cat_zip"]
    assert df.loc["c1", "cat_country"] == "UK" and df.loc["c2", "cat_country"] == "FR"
    assert pd.isna(df.loc["c3", "cat_country"])  # not in the customers table
    assert pd.isna(df.loc["c2", "cat_segment"]) and df.loc["c1", "cat_zip"] == "02139"
    # the behavioural features and labels are untouched by the join
    assert set(FEATURES) <= set(df.columns)
    assert df.loc["c1", "n_orders"] == 2 and df.loc["c1", "future_value"] == 30.0


ONLINE_RETAIL_HEADER = (
    "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
)
ONLINE_RETAIL_LINES = [
    # 17850: two lines from the UK, one from France -> UK
    "536365,85123A,HOLDER,6,2011-01-01 08:26:00,2.55,17850.0,United Kingdom",
    "536366,71053,LANTERN,6,2011-01-02 08:26:00,3.39,17850.0,United Kingdom",
    "536367,84406B,HANGER,8,2011-01-03 08:26:00,2.75,17850.0,France",
    # 12345: one line each from Germany and Austria -> the tie goes to Austria
    "536368,22752,SET,2,2011-01-04 09:00:00,7.65,12345.0,Germany",
    "536369,21730,LIGHT,6,2011-01-05 09:00:00,4.25,12345.0,Austria",
    # 14000: two lines without a country, one from Japan -> a known country wins
    "536370,22633,HAND,6,2011-01-06 09:00:00,1.85,14000.0,",
    "536371,22632,WARMER,6,2011-01-07 09:00:00,1.85,14000.0,",
    "536372,84879,BIRD,32,2011-01-08 09:00:00,1.69,14000.0,Japan",
    # 13000: no country at all -> missing
    "536373,22745,POPPY,6,2011-01-09 09:00:00,2.10,13000.0,",
    # no CustomerID: rejected as transactions, no customer
    "536374,22748,FOX,6,2011-01-10 09:00:00,2.10,,Spain",
    "536375,22749,OWL,6,2011-01-11 09:00:00,3.75,,United Kingdom",
]


def test_online_retail_derives_each_customers_most_frequent_country(ray_local, tmp_path):
    csv = tmp_path / "online_retail.csv"
    csv.write_text(ONLINE_RETAIL_HEADER + "\n".join(ONLINE_RETAIL_LINES) + "\n")
    cfg = _config("data.source=online_retail_csv", f"data.transactions={csv}")
    run_dir = str(tmp_path / "run")
    # The customers table alone (ingest() would add the transactions table's passes).
    counts = ingest_customers(open_customers(cfg, Storage()), cfg, Storage(), run_dir).as_dict()
    # one input row per distinct CustomerID
    assert (counts["rows_in"], counts["rows_accepted"], counts["rows_rejected"]) == (4, 4, 0)
    table = _read(f"{run_dir}/ingest/customers")
    country = {
        c: None if pd.isna(v) else v
        for c, v in zip(table["customer_id"], table["Country"], strict=True)
    }
    # canonical ids: "17850.0" in the CSV is customer "17850", as in the transactions
    assert country == {
        "17850": "United Kingdom",
        "12345": "Austria",
        "14000": "Japan",
        "13000": None,
    }
    assert not Storage().exists(f"{run_dir}/tmp/customers_source")  # staging removed
    # The same ids as the accepted transactions of that CSV, so the features join finds
    # every customer (the transactions path, run without Ray on the same string columns).
    lines = pacsv.read_csv(
        csv,
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in ["CustomerID", "InvoiceNo", "InvoiceDate"]}
        ),
    ).to_pandas()
    tx = validate_transactions(online_retail_to_transactions(lines))
    assert set(tx.loc[tx["_reject_reason"].isna(), "customer_id"]) == set(country)


def test_unknown_customer_attribute_names_file_and_column(ray_local, tmp_path):
    csv = tmp_path / "customers.csv"
    csv.write_text(CUSTOMERS_CSV)
    tx = tmp_path / "transactions.csv"
    tx.write_text("customer_id,order_id,ts,amount\nc1,o1,2023-01-05,1.0\n")
    cfg = _config(
        "data.source=contract_parquet",
        f"data.transactions={tx}",
        f"data.customers={csv}",
        "data.customer_attributes=[Country, Regoin]",
    )
    run_dir = tmp_path / "run"
    with pytest.raises(
        ContractError, match=rf"{re.escape(str(csv))}: data.customer_attributes .*'Regoin'"
    ):
        ingest(cfg, Storage(), str(run_dir))
    assert not run_dir.exists()  # failed before any table was ingested
    retail = _config(
        "data.source=online_retail_csv",
        f"data.transactions={tx}",
        "data.customer_attributes=[Region]",
    )
    with pytest.raises(
        ContractError, match=rf"{re.escape(str(tx))}: data.customer_attributes .*'Region'"
    ):
        ingest(retail, Storage(), str(run_dir))


def test_categorical_name_is_a_valid_feature_name():
    assert categorical_name("Country") == "cat_country"
    assert categorical_name("Tier [2024]") == "cat_tier__2024_"


def test_numeric_features_build_the_frame_as_before():
    df = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, np.nan], "split": ["train", "test"]})
    pd.testing.assert_frame_equal(feature_frame(df, ["a", "b"], {}), df[["a", "b"]])


def _categorical_customers(n: int = 900, seed: int = 0) -> pd.DataFrame:
    """Future value set by country (UK spends ten times more), plus a noise feature; "IT"
    appears only outside train, so it is an unseen category for the model."""
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "valid", "test"], n, p=[0.7, 0.15, 0.15])
    country = rng.choice(["UK", "FR", "DE", "ES"], n).astype(object)
    country[(split != "train") & (rng.random(n) < 0.2)] = "IT"
    country[rng.random(n) < 0.05] = None
    value = np.where(country == "UK", 100.0, 10.0) * rng.uniform(0.8, 1.2, n)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "noise": rng.normal(size=n),
            "cat_country": country,
            "future_value": value,
            "churned": (rng.random(n) < np.where(country == "UK", 0.1, 0.6)).astype("int64"),
            "split": split,
        }
    )


def test_native_categorical_model_uses_country_and_scores_unseen_values(ray_local, tmp_path):
    import ray.data

    df = _categorical_customers()
    customers = ray.data.from_pandas([df.iloc[:400], df.iloc[400:]])  # two blocks
    cfg = TrainSection(num_boost_round=40, early_stopping_rounds=10, max_depth=3, eta=0.3)
    models = train_models(
        customers, ["noise", "cat_country"], cfg, Storage(), str(tmp_path), "gbm_cat"
    )
    boosters = Boosters(models.uri, Storage())
    # fitted on train customers only: IT (valid/test only) is not a category
    assert sorted(boosters.categories["cat_country"]) == ["DE", "ES", "FR", "UK"]
    assert boosters.importance().get("cat_country", 0.0) > 0

    probe = pd.DataFrame(
        {"noise": [0.0] * 5, "cat_country": ["UK", "FR", "IT", "JP", None]}  # IT, JP unseen
    )
    pred = boosters.predict(probe)
    for values in pred.values():
        assert np.isfinite(values).all()
    value = pred["future_value_pred"]
    assert value[0] > 4 * value[1]  # the country carries the signal
    assert pred["churn_prob"][0] < pred["churn_prob"][1]

    contribs = boosters.contributions(probe)
    assert contribs.shape == (5, 3) and np.isfinite(contribs).all()
    top = top_contributions(contribs, boosters.features, 1)
    assert top["top_feature_1"][:2] == ["cat_country", "cat_country"]

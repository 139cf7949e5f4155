"""A corpus of broken files in every supported format, written here, read without Ray.

Each case asserts its outcome class: `rows` (every input row accepted or rejected with its
reason), `stop` (BadFileError naming the file before or while reading it) or `skip`
(`ingest.on_bad_file: skip`: the file is one counted reject). For `rows` the number of input
rows (known by construction) equals accepted + rejected.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from clvray.contract import RowRules
from clvray.ingest import read_validate_part
from clvray.io import BadFileError, plan_parts
from clvray.storage import Storage

RULES = RowRules(max_ts=pd.Timestamp("2030-01-01", tz="UTC"))
HEADER = "customer_id,order_id,ts,amount\n"
GOOD = "c1,o1,2023-01-05,10.0\nc2,o2,2023-01-06T10:00:00Z,5\n"


def _ingest_files(folder: Path, table: str = "transactions", source: str = "contract_parquet",
                  on_bad_file: str = "stop", block_rows: int = 1000):  # fmt: skip
    """Plan, read and validate every part of `folder`: the staged rows, concatenated."""
    parts, _ = plan_parts(str(folder), Storage(), block_rows, on_bad_file)
    fs = pafs.LocalFileSystem()
    staged = [read_validate_part(p, table, source, fs, RULES, on_bad_file) for p in parts]
    rows = pa.concat_tables(staged).to_pylist()
    return pd.DataFrame(rows, columns=staged[0].column_names, dtype=object), parts


def _reasons(df: pd.DataFrame) -> list:
    return [r for r in df["_reject_reason"] if r is not None]


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------------------- rows: CSV


def test_csv_short_and_long_rows_are_rejects_with_line_numbers(tmp_path):
    _write(
        tmp_path / "in",
        "a.csv",
        HEADER + GOOD + "c3,o3,2023-01-07\nc4,o4,2023-01-07,1,extra\nc5,o5,2023-01-08,2\n",
    )
    df, _ = _ingest_files(tmp_path / "in")
    assert len(df) == 5  # 5 input rows
    reasons = _reasons(df)
    assert reasons == [
        "csv: line has 3 fields, the header 4",
        "csv: line has 5 fields, the header 4",
    ]
    raws = [json.loads(r) for r in df["_raw"] if r is not None]
    assert [r["_line"] for r in raws] == [4, 5]
    assert df["customer_id"].dropna().tolist() == ["c1", "c2", "c5"]


def test_csv_invalid_utf8_is_decoded_and_counted(tmp_path):
    _write(
        tmp_path / "in", "a.csv", HEADER.encode() + b"c\xff1,o1,2023-01-05,1\nc2,o2,2023-01-05,2\n"
    )
    df, _ = _ingest_files(tmp_path / "in")
    assert df["customer_id"].tolist() == ["c\ufffd1", "c2"]
    assert df["_decode_errors"].tolist() == [1, 0] and _reasons(df) == []


def test_csv_bad_values_are_rejected_not_raised(tmp_path):
    rows = "c1,o1,2023-01-05,abc\nc2,o2,02/30/2010,1\nc3,o3,1361923200000,1e300\n,o4,2023-01-05,1\n"
    _write(tmp_path / "in", "a.csv.gz", gzip.compress((HEADER + rows).encode()))
    df, _ = _ingest_files(tmp_path / "in")
    assert len(df) == 4
    assert _reasons(df) == [
        "amount: not a finite number",
        "ts: not a valid date read as month first",
        "amount: beyond ingest.max_abs_amount 1e+09",
        "customer_id: missing or empty",
    ]


def test_csv_header_only_is_zero_rows(tmp_path):
    _write(tmp_path / "in", "a.csv", HEADER)
    df, _ = _ingest_files(tmp_path / "in")
    assert len(df) == 0


# ---------------------------------------------------------------------------- rows: JSON


def test_json_lines_not_json_wrong_type_and_bad_bytes(tmp_path):
    lines = [
        b'{"customer_id": "c1", "order_id": "o1", "ts": "2023-01-05T00:00:00.123456789Z", "amount": 1}',
        b'{"customer_id": "c2", "order_id": "o2", "ts": 1672876800000, "amount": 2.5}',
        b"{not json",
        b'{"customer_id": 7, "order_id": "o3", "ts": "2023-01-05", "amount": "oops"}',
        b'["an", "array"]',
        b'{"customer_id": "c\xff4", "order_id": "o4", "ts": "2023-01-05", "amount": 3}',
        b"",
    ]
    _write(tmp_path / "in", "a.jsonl", b"\n".join(lines))
    df, _ = _ingest_files(tmp_path / "in")
    assert len(df) == 6  # six non-blank lines
    reasons = df["_reject_reason"].tolist()
    assert reasons[:4] == [None, None, "amount: not a finite number", None]
    assert sorted(r for r in reasons[4:]) == [
        "json: line is not a JSON object",
        "json: line is not valid JSON (Expecting property name enclosed in double quotes)",
    ]
    assert df["customer_id"].tolist()[:4] == ["c1", "c2", "7", "c\ufffd4"]
    assert df["ts"].iloc[0] == pd.Timestamp("2023-01-05 00:00:00.123456", tz="UTC")
    assert df["ts"].iloc[1] == pd.Timestamp("2023-01-05", tz="UTC")  # epoch ms
    bad = [
        json.loads(r)
        for r, x in zip(df["_raw"], reasons, strict=True)
        if x and x.startswith("json")
    ]
    assert sorted(b["_line"] for b in bad) == [3, 5]


def test_amazon_json_field_changing_type_is_a_row_reject(tmp_path):
    base = {"reviewerID": "A1", "asin": "P1", "unixReviewTime": 1393545600, "overall": 5.0,
            "reviewText": "ok", "summary": "fine"}  # fmt: skip
    odd = dict(base, asin="P2", overall="five stars")
    _write(tmp_path / "in", "r.json", "\n".join(json.dumps(x) for x in (base, odd)) + "\n")
    df, _ = _ingest_files(tmp_path / "in", "reviews", "amazon_reviews_json")
    assert df["_reject_reason"].tolist() == [None, "rating: not an integer in 1..5"]


# ------------------------------------------------------------------------- rows: parquet


def test_parquet_nanoseconds_and_int_epochs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    ts = pa.array([1_700_000_000_123_456_789, 1_700_000_000_000_000_001], pa.timestamp("ns"))
    pq.write_table(pa.table({"customer_id": [1, 2], "order_id": ["o1", "o2"], "ts": ts,
                             "amount": [1.0, 2.0]}), folder / "a.parquet")  # fmt: skip
    df, _ = _ingest_files(folder)
    assert df["customer_id"].tolist() == ["1", "2"] and _reasons(df) == []
    assert df["ts"].iloc[0] == pd.Timestamp(1_700_000_000_123_456, unit="us", tz="UTC")


def test_parquet_row_groups_become_bounded_parts(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    n = 1000
    table = pa.table({"customer_id": [f"c{i}" for i in range(n)], "order_id": ["o"] * n,
                      "ts": ["2023-01-05"] * n, "amount": [1.0] * n})  # fmt: skip
    pq.write_table(table, folder / "a.parquet", row_group_size=100)
    df, parts = _ingest_files(folder, block_rows=250)
    assert len(parts) == 5 and len(df) == n and _reasons(df) == []


# ------------------------------------------------------------------ stop / skip: bad files


def _good_parquet(folder: Path, name: str, amount_type: pa.DataType | None = None) -> None:
    amount_type = amount_type or pa.float64()
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"customer_id": ["c1"], "order_id": ["o1"], "ts": ["2023-01-05"],
                      "amount": pa.array(["1"] if amount_type == pa.string() else [1], amount_type)})  # fmt: skip
    pq.write_table(table, folder / name)


def _truncated_parquet(folder: Path, name: str) -> None:
    _good_parquet(folder, "tmp.parquet")
    data = (folder / "tmp.parquet").read_bytes()
    (folder / "tmp.parquet").unlink()
    (folder / name).write_bytes(data[: len(data) // 2])


def _schema_differs(folder: Path, name: str) -> None:
    _good_parquet(folder, name, pa.string())


def _corrupt_gzip(folder: Path, name: str) -> None:
    data = gzip.compress((HEADER + GOOD * 200).encode())
    _write(folder, name, data[:40] + b"\x00" * 30 + data[70:])


def _truncated_gzip(folder: Path, name: str) -> None:
    data = gzip.compress((HEADER + GOOD * 200).encode())
    _write(folder, name, data[: len(data) // 2])


def _csv_other_header(folder: Path, name: str) -> None:
    _write(folder, name, "customer,order,when,amount\nc1,o1,2023-01-05,1\n")


BAD_FILES = [
    ("truncated parquet", "b.parquet", _truncated_parquet, "not a readable parquet file"),
    ("parquet column type differs", "b.parquet", _schema_differs, "schema differs from"),
    ("corrupt gzip", "b.csv.gz", _corrupt_gzip, "cannot be read"),
    ("truncated gzip", "b.csv.gz", _truncated_gzip, "cannot be read"),
    ("CSV header differs", "b.csv", _csv_other_header, "CSV header"),
]


def _sibling(folder: Path, name: str) -> None:
    if name.endswith(".parquet"):
        _good_parquet(folder, "a.parquet")
    else:
        _write(folder, "a.csv", HEADER + GOOD)


@pytest.mark.parametrize(
    ("case", "name", "make", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_bad_file_stops_naming_it(tmp_path, case, name, make, message):
    folder = tmp_path / "in"
    _sibling(folder, name)
    make(folder, name)
    with pytest.raises(BadFileError, match=rf"{folder / name}: {message}.*on_bad_file: skip"):
        _ingest_files(folder)


@pytest.mark.parametrize(
    ("case", "name", "make", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_bad_file_skipped_and_counted(tmp_path, case, name, make, message):
    folder = tmp_path / "in"
    _sibling(folder, name)
    make(folder, name)
    df, _ = _ingest_files(folder, on_bad_file="skip")
    good_rows = 1 if name.endswith(".parquet") else 2
    assert len(df) == good_rows + 1  # the sibling's rows and one reject for the bad file
    reasons = _reasons(df)
    assert len(reasons) == 1 and reasons[0].startswith("file: ") and message in reasons[0]
    assert json.loads(df["_raw"].dropna().iloc[0])["_file"] == str(folder / name)


def test_online_retail_slash_dates_one_order_per_file(tmp_path):
    """Issue 12's file: `01/12/2010` is 1 December, because `13/12/2010` shows day first."""
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    rows = [
        "536365,85123A,HOLDER,6,01/12/2010 08:26,2.55,17850.0,United Kingdom",
        "536366,71053,LANTERN,2,13/12/2010 9:01,3.39, 17850 ,United Kingdom",
        "C536367,84406B,HANGER,-1,14/12/2010 10:00,2.75,12345.0,France",
    ]
    _write(tmp_path / "in", "retail.csv", header + "\n".join(rows) + "\n")
    df, _ = _ingest_files(tmp_path / "in", source="online_retail_csv")
    assert _reasons(df) == []
    assert df["ts"].tolist() == [
        pd.Timestamp("2010-12-01 08:26", tz="UTC"),
        pd.Timestamp("2010-12-13 09:01", tz="UTC"),
        pd.Timestamp("2010-12-14 10:00", tz="UTC"),
    ]
    assert df["customer_id"].tolist() == ["17850", "17850", "12345"]
    assert df["amount"].tolist() == pytest.approx([15.3, 6.78, -2.75])

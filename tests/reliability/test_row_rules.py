"""Row rules as pure functions (no Ray): examples from issue 12 and hypothesis properties."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clvray.contract import (
    RowRules,
    canonical_ids,
    parse_ts,
    pseudonymize,
    scrub_text,
    validate_reviews_table,
    validate_transactions_table,
)

RULES = RowRules(max_ts=pd.Timestamp("2030-01-01", tz="UTC"))
settings.register_profile("clvray", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("clvray")

# Microseconds between 1990 and 2029: the valid range of RULES.
VALID_US = st.integers(631_152_000_000_000, 1_893_456_000_000_000 - 1)


def _ts(values, rules: RowRules = RULES) -> tuple[list, list]:
    parsed = parse_ts(values, rules)
    return parsed.ts.to_pylist(), list(parsed.reason)


def _utc(s: str) -> dt.datetime:
    return pd.Timestamp(s, tz="UTC").to_pydatetime()


@given(VALID_US)
def test_epoch_units_by_magnitude_agree(us):
    """The same instant as integer seconds, ms, us, ns (and float seconds) is one timestamp."""
    s = us // 1_000_000
    whole = pd.Timestamp(s * 1_000_000, unit="us", tz="UTC").to_pydatetime()
    exact = pd.Timestamp(us, unit="us", tz="UTC").to_pydatetime()
    ts, reasons = _ts(pa.array([s, us // 1000, us, us * 1000]))
    assert reasons == [None] * 4
    assert ts[0] == whole
    assert ts[1] == pd.Timestamp(us // 1000 * 1000, unit="us", tz="UTC").to_pydatetime()
    assert ts[2] == ts[3] == exact
    # as digit strings too (a CSV column)
    ts_s, _ = _ts(pa.array([str(s), str(us)]))
    assert ts_s == [whole, exact]


def test_epoch_milliseconds_are_not_read_as_seconds():
    # 2013-02-27 in ms: read as seconds it would be the year 45000 (or wrap to 1970)
    ts, reasons = _ts(pa.array([1_361_923_200_000]))
    assert reasons == [None] and ts == [_utc("2013-02-27")]


def test_configured_epoch_unit_wins():
    ts, reasons = _ts(pa.array([1_361_923_200_000]), RowRules(epoch_unit="s", max_ts=RULES.max_ts))
    assert ts == [None] and reasons[0].startswith("ts: outside")


@given(VALID_US, st.integers(0, 9), st.sampled_from(["", "Z", "+00:00", "+05:30", "-08:00"]))
def test_iso_strings_any_precision_and_zone(us, digits, zone):
    t = pd.Timestamp(us, unit="us")
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        frac = f"{t.microsecond:06d}000"[:digits]
        text += "." + frac
    ts, reasons = _ts(pa.array([text + zone]))
    offset = pd.Timedelta(0)
    if zone not in ("", "Z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * pd.Timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    expected = pd.Timestamp(text).floor("us") - offset
    if reasons == [None]:
        assert ts[0] == expected.tz_localize("UTC").to_pydatetime()
    else:  # the zone moved it outside the valid range
        assert reasons[0].startswith("ts: outside")


def test_nanosecond_timestamps_typed_and_text():
    ns = pa.array([1_700_000_000_123_456_789], pa.timestamp("ns"))
    text = pa.array(["2023-11-14T22:13:20.123456789Z"])
    expected = pd.Timestamp(1_700_000_000_123_456, unit="us", tz="UTC").to_pydatetime()
    assert _ts(ns)[0] == [expected]
    assert _ts(text)[0] == [expected]
    assert _ts(pa.array([dt.date(2020, 2, 29)]))[0] == [_utc("2020-02-29")]


def test_slash_dates_one_order_per_column():
    # issue 12: 01/12/2010 became 12 January and 13/12/2010 13 December
    ts, reasons = _ts(pa.array(["01/12/2010 08:26", "13/12/2010 9:01", "05/01/2011"]))
    assert reasons == [None] * 3
    assert ts == [_utc("2010-12-01 08:26"), _utc("2010-12-13 09:01"), _utc("2011-01-05")]
    # a second field above 12: month first for the whole column
    ts, _ = _ts(pa.array(["12/1/2010 8:26", "12/13/2010 10:00"]))
    assert ts == [_utc("2010-12-01 08:26"), _utc("2010-12-13 10:00")]
    # configured format: rows that do not fit it are rejected, never swapped
    ts, reasons = _ts(
        pa.array(["01/12/2010", "12/13/2010"]),
        RowRules(date_format="dd/mm/yyyy", max_ts=RULES.max_ts),
    )
    assert ts[0] == _utc("2010-12-01") and ts[1] is None
    assert reasons[1] == "ts: not a valid date read as day first"


def test_slash_column_fitting_no_order_is_rejected_row_by_row():
    ts, reasons = _ts(pa.array(["13/01/2011", "01/13/2011", "2011-01-05"]))
    assert ts[:2] == [None, None] and ts[2] == _utc("2011-01-05")
    assert all("fit no single day/month order" in r for r in reasons[:2]) and reasons[2] is None


@given(st.lists(st.dates(dt.date(1990, 1, 1), dt.date(2029, 12, 31)), min_size=1, max_size=30))
def test_slash_dates_detected_from_the_whole_column(days):
    """Written day first with at least one day above 12: every date reads back exactly."""
    days = [*days, dt.date(2020, 5, 25)]
    ts, reasons = _ts(pa.array([d.strftime("%d/%m/%Y") for d in days]))
    assert reasons == [None] * len(days)
    assert ts == [_utc(d.isoformat()) for d in days]


def test_range_rejects_and_missing():
    ts, reasons = _ts(pa.array(["2100-01-01", "1970-01-02", "", None, "not a date", "2020-01-01"]))
    assert reasons[0].startswith("ts: outside ingest.min_ts..ingest.max_ts")
    assert reasons[1].startswith("ts: outside")
    assert reasons[2:5] == ["ts: missing", "ts: missing", "ts: unparseable"]
    assert reasons[5] is None and ts[5] == _utc("2020-01-01")


@given(st.integers(-(10**15), 10**15))
def test_ids_have_one_canonical_form(n):
    forms = [str(n), f" {n} ", f"{n}.0", f"{n}.00"]
    ids, _ = canonical_ids(pa.array(forms))
    assert ids.to_pylist() == [str(n)] * 4
    assert canonical_ids(pa.array([n]))[0].to_pylist() == [str(n)]
    if abs(n) < 2**53:
        assert canonical_ids(pa.array([float(n)]))[0].to_pylist() == [str(n)]


def test_ids_trim_keep_text_and_decode_bytes():
    ids, flags = canonical_ids(pa.array([b" c1", b"\xffc2", b"", None, b"12.5"], pa.binary()))
    assert ids.to_pylist() == ["c1", "\ufffdc2", None, None, "12.5"]
    assert flags.tolist() == [0, 1, 0, 0, 0]
    assert canonical_ids(pa.array([" c1 ", "007"]))[0].to_pylist() == ["c1", "007"]


@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))))
def test_amount_rule_bounds_every_accepted_sum(amounts):
    n = len(amounts)
    table = pa.table(
        {
            "customer_id": ["c"] * n,
            "order_id": [f"o{i}" for i in range(n)],
            "ts": ["2020-01-01"] * n,
            "amount": pa.array([str(a) for a in amounts]),
        }
    )
    out = validate_transactions_table(table, RULES)
    assert out.num_rows == n
    ok = out.filter(out["_reject_reason"].is_null())
    x = np.asarray(ok["amount"].to_pylist(), dtype=float)
    assert np.all(np.abs(x) <= RULES.max_abs_amount)
    # even 10^9 rows of accepted amounts cannot sum to inf
    assert np.isfinite(np.abs(x).sum() * 1e9)
    rejected = out.filter(out["_reject_reason"].is_valid())
    assert all(r.startswith("amount: ") for r in rejected["_reject_reason"].to_pylist())
    assert rejected["_raw"].null_count == 0 and ok["_raw"].null_count == ok.num_rows


def test_issue_examples_transactions():
    table = pa.table(
        {
            "customer_id": ["12345", "12345.0", " c1", "c1", "c2", "c3"],
            "order_id": ["o1", "o2", "o3", "o4", "o5", "o6"],
            "ts": [
                "2020-01-01",
                "2020-01-02",
                "2020-01-03",
                "2020-01-04",
                "2100-01-01",
                "Jan 5 2020",
            ],
            "amount": [1.0, 2.0, 3.0, 1e300, 4.0, 5.0],
        }
    )
    out = validate_transactions_table(table, RULES)
    assert out["customer_id"].to_pylist()[:4] == ["12345", "12345", "c1", "c1"]
    reasons = out["_reject_reason"].to_pylist()
    assert reasons[:3] == [None] * 3
    assert reasons[3] == "amount: beyond ingest.max_abs_amount 1e+09"
    assert reasons[4].startswith("ts: outside")
    assert reasons[5] == "ts: unparseable"  # not ISO 8601 and not a slash date


SCRUB_CASES = [
    ("write to jane.doe+shop@example.co.uk please", "jane.doe", "<email>"),
    ("see https://shop.example.com/p?id=3 now", "shop.example", "<url>"),
    ("or www.example.org/x", "example.org", "<url>"),
    ("card 4111 1111 1111 1111 was charged", "4111", "<card>"),
    ("card 4111-1111-1111-1111", "1111", "<card>"),
    ("call +44 20 7946 0958 today", "7946", "<phone>"),
    ("call (555) 123-4567", "123-4567", "<phone>"),
    ("call 555.123.4567", "555.123", "<phone>"),
]


@pytest.mark.parametrize(("text", "secret", "placeholder"), SCRUB_CASES)
def test_scrub_text_examples(text, secret, placeholder):
    out = scrub_text(pa.array([text])).to_pylist()[0]
    assert secret not in out and placeholder in out


def test_scrub_keeps_ordinary_numbers_and_dates():
    text = "bought 3 sets on 2023-01-05 for 12.50, 5 stars"
    assert scrub_text(pa.array([text])).to_pylist() == [text]


@given(
    st.from_regex(r"[a-z]{2,8}(\.[a-z]{2,5})?", fullmatch=True),
    st.from_regex(r"[a-z]{3,8}\.(com|org|de)", fullmatch=True),
    st.text(alphabet="abc .,!", max_size=20),
)
def test_scrub_removes_any_planted_email(user, domain, filler):
    out = scrub_text(pa.array([f"{filler} {user}@{domain} {filler}"])).to_pylist()[0]
    assert f"{user}@{domain}" not in out and "<email>" in out


def test_reviews_text_truncated_scrubbed_and_decoded():
    table = pa.table(
        {
            "customer_id": ["a", "b"],
            "review_id": ["r1", "r2"],
            "ts": [1_600_000_000, 1_600_000_000],
            "text": pa.array([b"mail bob@example.com " + b"x" * 50, b"bad \xff byte"]),
            "rating": ["5", "2.5"],
        }
    )
    out = validate_reviews_table(table, RowRules(max_text_chars=30, max_ts=RULES.max_ts))
    text = out["text"].to_pylist()
    assert text[0].startswith("mail <email> x") and len(text[0]) <= 30
    assert text[1] == "bad \ufffd byte"
    assert out["_decode_errors"].to_pylist() == [0, 1]
    assert out["_reject_reason"].to_pylist() == [None, "rating: not an integer in 1..5"]


def test_pseudonymize_is_keyed_and_consistent():
    ids = pa.array(["c1", "c2", "c1", None])
    a = pseudonymize(ids, b"key-1").to_pylist()
    assert a[0] == a[2] != a[1] and a[3] is None and "c1" not in a
    assert pseudonymize(ids, b"key-2").to_pylist()[0] != a[0]
    table = pa.table({"customer_id": ["12345.0", "12345"], "order_id": ["o", "p"],
                      "ts": ["2020-01-01"] * 2, "amount": [1.0, 2.0]})  # fmt: skip
    out = validate_transactions_table(table, RowRules(id_key=b"k", max_ts=RULES.max_ts))
    hashed = out["customer_id"].to_pylist()
    assert hashed[0] == hashed[1] and "12345" not in hashed[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("features.horizon_days=true", r"'features\.horizon_days'.*valid integer"),
        ("train.max_depth='3'", r"'train\.max_depth'.*valid integer"),
        ("features.cutoff=2023-13-01", r"'features\.cutoff'.*"),
        ("train.quantiles=[0.1, 1.2]", r"'train\.quantiles'.*inside \(0, 1\)"),
        ("ingest.min_ts=2020-01-01", None),
    ],
)
def test_config_types_are_strict(override, message):
    from clvray.config import ConfigError, load_config

    if message is None:
        assert load_config(None, [override]).ingest.min_ts == dt.date(2020, 1, 1)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_time_protocol_names_key_and_range():
    from clvray.config import load_config
    from clvray.ingest import DataRangeError, check_time_protocol

    counts = {
        "transactions": {
            "rows_in": 10,
            "rows_accepted": 10,
            "ts_min": "2022-01-03T00:00:00+00:00",
            "ts_max": "2023-12-31T00:00:00+00:00",
        }
    }
    check_time_protocol(load_config(None, ["features.cutoff=2023-06-01"]), counts)
    with pytest.raises(DataRangeError, match=r"features\.cutoff 2021-01-01 .*2022-01-03"):
        check_time_protocol(load_config(None, ["features.cutoff=2021-01-01"]), counts)
    with pytest.raises(DataRangeError, match=r"features\.cutoff 2023-12-01 .*2023-10-02\]"):
        check_time_protocol(load_config(None, ["features.cutoff=2023-12-01"]), counts)
    with pytest.raises(DataRangeError, match=r"features\.horizon_days 800 .*2022-01-03 to"):
        check_time_protocol(load_config(None, ["features.horizon_days=800"]), counts)
    with pytest.raises(DataRangeError, match="no transaction was accepted"):
        check_time_protocol(load_config(None, []), {"transactions": {"rows_accepted": 0}})


def test_config_written_with_url_credentials_redacted():
    from clvray.config import load_config

    cfg = load_config(
        None,
        [
            "tracking.mlflow_uri=https://alice:planted-secret-1@mlflow.example.com/x",
            "data.transactions=s3://bucket/tx?token=planted-secret-2&part=1",
        ],
    )
    text = cfg.to_yaml()
    assert "planted-secret" not in text
    assert "https://***@mlflow.example.com/x" in text and "token=***&part=1" in text


def test_mlflow_params_carry_no_credentials():
    from clvray.config import load_config
    from clvray.observability import config_params

    cfg = load_config(
        None,
        [
            "tracking.mlflow_uri=https://alice:planted-secret-1@mlflow.example.com/x",
            "data.transactions=s3://bucket/tx?token=planted-secret-2&part=1",
        ],
    )
    params = config_params(cfg)
    assert not any("planted-secret" in v for v in params.values())
    assert params["tracking.mlflow_uri"] == "https://***@mlflow.example.com/x"

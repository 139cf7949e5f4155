"""The data contract: the schemas every source is mapped to, and the row rules.

The rule functions work on one pyarrow table or pandas batch (no Ray), so they are unit-tested
(and property-tested) directly; ingest runs them inside its read tasks. Every rule is
vectorised (Arrow compute, numpy, pandas' C parsers): Python runs per rejected row (to keep
its raw text) and per distinct id (the keyed hash), never per accepted row.

The rules, in the order a row is tested (the first broken one is the reason):
- ids (`customer_id`, `order_id`, `review_id`): one canonical string in every source: bytes
  decoded as UTF-8 (invalid bytes replaced and counted), whitespace trimmed, an integral
  number `12345`, `12345.0` or `" 12345.0 "` is `"12345"`; empty is missing;
- `ts`: a timestamp (any precision, nanoseconds truncated to microseconds, zones converted to
  UTC, naive taken as UTC), an ISO string with or without zone or a date, epoch seconds,
  milliseconds, microseconds or nanoseconds (by magnitude, or `ingest.epoch_unit`), or a slash
  date `01/12/2010 08:26` read with ONE day/month order per file (`ingest.date_format`, or
  detected from the whole column: a first field above 12 means day first, a second field
  above 12 month first, neither: month first); inside `[ingest.min_ts, ingest.max_ts]`;
- `amount`: a finite number with `|amount| <= ingest.max_abs_amount`, so no sum of accepted
  amounts can overflow;
- `rating`: an integer 1..5 when present;
- `text`: decoded like ids, scrubbed of e-mails, URLs, card and phone numbers
  (`privacy.scrub_text`) and truncated to `ingest.max_text_chars`; never rejected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TS = pa.timestamp("us", tz="UTC")

TRANSACTIONS = pa.schema(
    [
        ("customer_id", pa.string()),
        ("order_id", pa.string()),
        ("ts", TS),
        ("amount", pa.float64()),
    ]
)

REVIEWS = pa.schema(
    [
        ("customer_id", pa.string()),
        ("review_id", pa.string()),
        ("ts", TS),
        ("text", pa.string()),
        ("rating", pa.int8()),
        ("order_id", pa.string()),
        ("product_id", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("table", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),
    ]
)

SCHEMAS = {"transactions": TRANSACTIONS, "reviews": REVIEWS}
CUSTOMER_KEY = "customer_id"
REQUIRED_INPUT = {
    "transactions": ["customer_id", "order_id", "ts", "amount"],
    "reviews": ["customer_id", "review_id", "ts", "text"],
    "customers": ["customer_id"],
}
REASON = "_reject_reason"
RAW = "_raw"
"""JSON of the input row, kept for rejected rows only (null for accepted ones)."""
DECODE_ERRORS = "_decode_errors"
"""Per row: how many of its values held invalid UTF-8 (replaced by U+FFFD)."""
ID_COLUMNS = ("customer_id", "order_id", "review_id")


class ContractError(ValueError):
    """A file cannot be mapped to the contract at all (a missing column, say)."""


def require_columns(present: Iterable[str], required: Iterable[str], what: str) -> None:
    """The one column check: raises `ContractError` naming `what` (a file, a dataset, a frame)
    and every required column it lacks."""
    names = [str(c) for c in present]
    missing = [c for c in required if c not in names]
    if missing:
        raise ContractError(f"{what} lacks required column(s) {missing}; found {sorted(names)}")


def staged_schema(schema: pa.Schema) -> pa.Schema:
    """The contract schema plus the columns ingest stages before splitting accepted/rejects."""
    return (
        schema.append(pa.field(REASON, pa.string()))
        .append(pa.field(RAW, pa.string()))
        .append(pa.field(DECODE_ERRORS, pa.int32()))
    )


@dataclass(frozen=True)
class RowRules:
    """The configured row rules (from `ingest.*` and `privacy.*`), handed to read tasks."""

    min_ts: pd.Timestamp = pd.Timestamp("1990-01-01", tz="UTC")
    max_ts: pd.Timestamp = field(
        default_factory=lambda: pd.Timestamp.now(tz="UTC").normalize() + pd.Timedelta(days=2)
    )
    max_abs_amount: float = 1e9
    epoch_unit: str = "auto"
    date_format: str = "auto"
    max_text_chars: int = 2000
    scrub_text: bool = True
    id_key: bytes | None = None
    """HMAC key for `privacy.pseudonymize_ids` (read from the environment, never stored)."""

    def __repr__(self) -> str:  # never print the key
        return f"RowRules(min_ts={self.min_ts}, max_ts={self.max_ts}, ...)"


def check_columns(table: str, columns: list[str], source: str) -> None:
    """Fail at the door when an input lacks a required column; names the file and column."""
    require_columns(columns, REQUIRED_INPUT[table], f"{source}: {table} input")


def as_utc(ts: Any) -> pd.Timestamp:
    """The one UTC conversion of a single timestamp (a cutoff, a data bound): tz-aware UTC; a
    naive value (Ray aggregates drop the zone) is taken as UTC."""
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def id_hash64(
    values: pa.ChunkedArray | pa.Array | np.ndarray | pd.Series | list, salt: str = ""
) -> np.ndarray:
    """The one stable hash of ids: a uint64 per value, the same on every node, run and Python
    process (SipHash with a fixed key, vectorised; never Python's salted `hash`). `salt` gives
    independent hashes for different purposes (the split, samples)."""
    arr = (
        values.to_numpy(zero_copy_only=False)
        if isinstance(values, (pa.Array, pa.ChunkedArray))
        else np.asarray(values)
    )
    key = hashlib.md5(f"clvray:{salt}".encode()).hexdigest()[:16]
    return pd.util.hash_array(arr.astype(object), hash_key=key)


def unit_hash(
    values: pa.ChunkedArray | pa.Array | np.ndarray | pd.Series | list, salt: str = ""
) -> np.ndarray:
    """`id_hash64` as a uniform number in [0, 1) per value."""
    return (id_hash64(values, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def customer_sample(batch: pd.DataFrame, share: float, salt: str) -> pd.DataFrame:
    """The rows of a pandas batch whose customer falls in the stable hash sample of `share`
    (a `map_batches` function). Unlike `Dataset.random_sample`, whose draw is seeded per block,
    the sample is the same whatever the blocks."""
    if share >= 1.0:
        return batch
    return batch[unit_hash(batch["customer_id"], salt) < share]


# ---------------------------------------------------------------------------------- strings


def _as_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, pd.Series):
        values = values.astype(object).where(values.notna(), None)
        try:
            return pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # mixed Python types in one object column (a JSON field that changes type)
            return pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.array(values, from_pandas=True)


def decode_utf8(values) -> tuple[pa.Array, np.ndarray]:
    """Any array as strings; bytes decoded as UTF-8 with invalid bytes replaced (U+FFFD).

    Returns the strings and a per-row flag (int32 0/1) of replaced values. The cast validates
    the whole array in C; only an array that fails it is decoded value by value.
    """
    arr = _as_array(values)
    flags = np.zeros(len(arr), np.int32)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type):
        return arr, flags
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        return arr.cast(pa.string()), flags
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string()), flags
    if (
        pa.types.is_binary(arr.type)
        or pa.types.is_large_binary(arr.type)
        or pa.types.is_fixed_size_binary(arr.type)
    ):
        try:
            return arr.cast(pa.string()), flags
        except pa.ArrowInvalid:
            # Rare (a hostile file): decode value by value, flag what changed.
            out: list[str | None] = []
            for i, b in enumerate(arr.to_pylist()):
                if b is None:
                    out.append(None)
                    continue
                try:
                    out.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append(b.decode("utf-8", errors="replace"))
                    flags[i] = 1
            return pa.array(out, pa.string()), flags
    if pa.types.is_floating(arr.type):
        return _float_ids(arr), flags
    return arr.cast(pa.string()), flags


def _float_ids(arr: pa.Array) -> pa.Array:
    x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    finite = np.isfinite(x)
    integral = finite & (np.floor(np.where(finite, x, 0)) == np.where(finite, x, 0))
    integral &= np.abs(np.where(finite, x, 0)) < 2**53
    as_int = pa.array(np.where(integral, x, 0).astype(np.int64)).cast(pa.string())
    as_float = pa.array(x).cast(pa.string())
    out = pc.if_else(pa.array(integral), as_int, as_float)
    return pc.if_else(pa.array(np.isnan(x)), pa.nulls(len(x), pa.string()), out)


def canonical_ids(values) -> tuple[pa.Array, np.ndarray]:
    """Ids in their one canonical string form: trimmed, `12345.0` -> `12345`, "" -> null.

    The same function maps every source (CSV strings, parquet ints or floats, JSON numbers),
    so `12345`, `12345.0` and ` 12345 ` are one customer. Returns (ids, decode-error flags).
    """
    arr, flags = decode_utf8(values)
    arr = pc.utf8_trim_whitespace(arr)
    arr = pc.replace_substring_regex(arr, pattern=r"^([+-]?\d+)\.0*$", replacement=r"\1")
    arr = pc.if_else(pc.equal(arr, ""), pa.nulls(len(arr), pa.string()), arr)
    return arr, flags


def pseudonymize(ids: pa.Array, key: bytes) -> pa.Array:
    """HMAC-SHA256 of each id under `key` (hex, 32 chars); nulls stay null.

    Hashes each distinct id of the array once (Python per distinct id, not per row).
    """
    uniq = pc.unique(ids)
    digests = [
        None if u is None else hmac.new(key, u.encode(), hashlib.sha256).hexdigest()[:32]
        for u in uniq.to_pylist()
    ]
    return pc.take(pa.array(digests, pa.string()), pc.index_in(ids, value_set=uniq))


# Ordered: an e-mail holds dots that the URL rule would take, a card number's digit groups
# would read as a phone number.
SCRUB_PATTERNS = (
    (r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", "<email>"),
    (r"(?i)\b(?:https?://|ftp://|www\.)[^\s<>\"']+", "<url>"),
    (r"\b(?:\d[ \-]?){12,18}\d\b", "<card>"),
    (
        r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,5}\)[\s.\-]?|\b\d{2,5}[\s.\-])\d{3,4}[\s.\-]?\d{3,4}\b",
        "<phone>",
    ),
)


def scrub_text(text: pa.Array) -> pa.Array:
    """E-mail addresses, URLs, card-like digit runs and phone numbers replaced by placeholders."""
    for pattern, placeholder in SCRUB_PATTERNS:
        text = pc.replace_substring_regex(text, pattern=pattern, replacement=placeholder)
    return text


# ----------------------------------------------------------------------------- timestamps

_EPOCH_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 1e-3}
_SLASH = (
    r"^(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4}|\d{2})"
    r"(?:[ T](?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2}(?:\.\d+)?))?)?$"
)
_NUMBER = r"^[+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?$"


def epoch_unit_by_magnitude(x: np.ndarray) -> np.ndarray:
    """Microseconds per unit of each epoch value: below 1e11 seconds (to year 5138), below
    1e14 milliseconds, below 1e17 microseconds, else nanoseconds."""
    a = np.abs(x)
    return np.select([a < 1e11, a < 1e14, a < 1e17], [1e6, 1e3, 1.0], 1e-3)


def _epoch_to_us(x: np.ndarray, unit: str) -> np.ndarray:
    """float64 epoch values to float64 microseconds (NaN stays NaN)."""
    per = epoch_unit_by_magnitude(x) if unit == "auto" else np.full(len(x), _EPOCH_US[unit])
    return x * per


def _int_epoch_to_us(arr: pa.Array, unit: str) -> np.ndarray:
    """int64 epoch values to microseconds, computed exactly in integers (as float64: exact
    for every value inside the valid range); values far outside it only need to stay outside."""
    x = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    per = epoch_unit_by_magnitude(x.astype(np.float64)) if unit == "auto" else None
    if per is None:
        per = np.full(len(x), _EPOCH_US[unit])
    with np.errstate(over="ignore"):
        exact = np.where(per >= 1, x * np.maximum(per, 1).astype(np.int64), x // 1000)
    approx = x.astype(np.float64) * per
    us = np.where(np.abs(approx) < 2**62, exact.astype(np.float64), approx)
    us[pc.is_null(arr).to_numpy(zero_copy_only=False)] = np.nan
    return us


def _slash_parts(strings: pa.Array) -> pa.StructArray:
    return pc.extract_regex(strings, pattern=_SLASH)


def slash_order(first: np.ndarray, second: np.ndarray, date_format: str) -> str | None:
    """The day/month order of a whole column of slash dates, or None when none fits.

    `first`/`second` are the first and second fields of every slash date in the file.
    """
    if date_format == "dd/mm/yyyy":
        return "day_first"
    if date_format == "mm/dd/yyyy":
        return "month_first"
    day_first = bool((first > 12).any())
    month_first = bool((second > 12).any())
    if day_first and month_first:
        return None
    return "day_first" if day_first else "month_first"


def _slash_to_iso(parts: pa.StructArray, order: str) -> pa.Array:
    a, b = parts.field("a"), parts.field("b")
    day, month = (a, b) if order == "day_first" else (b, a)
    year = parts.field("y")
    year = pc.if_else(
        pc.equal(pc.utf8_length(year), 2), pc.binary_join_element_wise("20", year, ""), year
    )

    def given(name: str, default: str):  # an optional group that did not match is ""
        values = parts.field(name)
        return pc.if_else(pc.fill_null(pc.equal(values, ""), True), default, values)

    hour, minute, sec = given("H", "0"), given("M", "00"), given("S", "00")

    def pad(s):
        return pc.utf8_lpad(s, width=2, padding="0")

    return pc.binary_join_element_wise(
        year, "-", pad(month), "-", pad(day), "T", pad(hour), ":", minute, ":", pad(sec), ""
    )


def _iso_to_us(strings: pa.Array) -> np.ndarray:
    """ISO 8601 strings (date, datetime, any fraction, with or without zone) to float64 us."""
    if len(strings) == 0:
        return np.zeros(0)
    parsed = pd.to_datetime(
        pd.Series(strings.to_pandas(), dtype=object),
        format="ISO8601",
        utc=True,
        errors="coerce",
    )
    nat = parsed.isna().to_numpy()
    ints = pd.DatetimeIndex(parsed).as_unit("ns").asi8
    # floor to the microsecond: the same value whatever sub-second precision was written
    us = (ints // 1_000).astype(np.float64)
    us[nat] = np.nan
    return us


@dataclass
class ParsedTimestamps:
    ts: pa.Array
    """timestamp[us, UTC]; null where rejected."""
    reason: np.ndarray
    """object array: None where accepted, else the rule broken."""


def parse_ts(values, rules: RowRules = RowRules()) -> ParsedTimestamps:  # noqa: B008
    """Timestamps of one column (of one whole file for text formats) to UTC microseconds.

    Vectorised per kind of value: typed timestamps and dates are cast; numbers are epochs
    (`rules.epoch_unit`, or by magnitude); strings of digits likewise; slash dates with one
    day/month order for the column (`slash_order`); every other string through pandas' ISO 8601
    parser. Values outside `[rules.min_ts, rules.max_ts]` are rejected, not clipped.
    """
    arr = _as_array(values)
    n = len(arr)
    reason = np.full(n, None, dtype=object)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    us = np.full(n, np.nan)
    missing = np.zeros(n, bool)
    if pa.types.is_timestamp(arr.type):
        t = arr.type
        t = pa.timestamp(t.unit, tz=t.tz or "UTC")
        us = _int_epoch_to_us(arr.cast(t).cast(pa.int64()), t.unit)
    elif pa.types.is_date(arr.type):
        days = arr.cast(pa.date32()).cast(pa.int32()).to_numpy(zero_copy_only=False)
        us = days.astype(np.float64) * 86_400e6
    elif pa.types.is_integer(arr.type):
        us = _int_epoch_to_us(arr, rules.epoch_unit)
    elif pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
        us = _epoch_to_us(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), rules.epoch_unit)
    elif pa.types.is_null(arr.type):
        pass
    else:
        strings, _ = decode_utf8(arr)
        strings = pc.utf8_trim_whitespace(strings)
        missing = pc.fill_null(pc.equal(strings, ""), True).to_numpy(zero_copy_only=False)
        is_number = pc.fill_null(pc.match_substring_regex(strings, pattern=_NUMBER), False)
        parts = _slash_parts(strings)
        is_slash = pc.fill_null(pc.is_valid(parts), False).to_numpy(zero_copy_only=False)
        is_number_np = is_number.to_numpy(zero_copy_only=False)
        if is_number_np.any():
            nums = pc.if_else(is_number, strings, pa.nulls(n, pa.string())).cast(pa.float64())
            x = nums.to_numpy(zero_copy_only=False)
            us = np.where(is_number_np, _epoch_to_us(x, rules.epoch_unit), us)
        iso = ~is_number_np & ~is_slash
        if iso.any():
            us = np.where(
                iso,
                _iso_to_us(pc.if_else(pa.array(iso), strings, pa.nulls(n, pa.string()))),
                us,
            )
        if is_slash.any():
            sub = parts.filter(pa.array(is_slash))
            first = sub.field("a").cast(pa.int32()).to_numpy(zero_copy_only=False)
            second = sub.field("b").cast(pa.int32()).to_numpy(zero_copy_only=False)
            order = slash_order(first, second, rules.date_format)
            if order is None:
                reason[is_slash] = (
                    "ts: slash dates fit no single day/month order in this file "
                    "(first field > 12 in some rows, second field > 12 in others); "
                    "set ingest.date_format"
                )
            else:
                iso_strings = _slash_to_iso(parts, order)
                slash_us = _iso_to_us(
                    pc.if_else(pa.array(is_slash), iso_strings, pa.nulls(n, pa.string()))
                )
                bad = is_slash & np.isnan(slash_us)
                reason[bad] = f"ts: not a valid date read as {order.replace('_', ' ')}"
                us = np.where(is_slash, slash_us, us)
    missing = missing | pc.is_null(arr).to_numpy(zero_copy_only=False)
    unset = reason == None  # noqa: E711 - elementwise on an object array
    reason[unset & missing] = "ts: missing"
    unset = reason == None  # noqa: E711
    reason[unset & np.isnan(us)] = "ts: unparseable"
    lo, hi = _us(rules.min_ts), _us(rules.max_ts)
    outside = ~np.isnan(us) & ((us < lo) | (us > hi))
    unset = reason == None  # noqa: E711
    reason[unset & outside] = (
        f"ts: outside ingest.min_ts..ingest.max_ts "
        f"[{rules.min_ts.date().isoformat()}, {rules.max_ts.date().isoformat()}]"
    )
    ok = reason == None  # noqa: E711
    ints = np.where(ok, np.nan_to_num(us, nan=0.0), 0).astype(np.int64)
    ts = pa.array(ints, pa.int64(), mask=~ok).cast(TS)
    return ParsedTimestamps(ts, reason)


def _us(ts: pd.Timestamp) -> float:
    return float(pd.Timestamp(ts).tz_convert("UTC").value // 1_000)


def to_utc_timestamp(value: dt.date | str | pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


# ---------------------------------------------------------------------------- numbers


def parse_numbers(values) -> tuple[np.ndarray, np.ndarray]:
    """float64 values and a `present` mask (not null, not blank) of a numeric or text column."""
    arr = _as_array(values)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    present = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return x, present
    if pa.types.is_boolean(arr.type) or pa.types.is_null(arr.type):
        return np.full(len(arr), np.nan), present
    strings = pc.utf8_trim_whitespace(decode_utf8(arr)[0])
    present = present & pc.fill_null(pc.not_equal(strings, ""), False).to_numpy(
        zero_copy_only=False
    )
    x = pd.to_numeric(pd.Series(strings.to_pandas(), dtype=object), errors="coerce")
    return x.to_numpy(dtype="float64", na_value=np.nan), present


def _first_reason(reasons: list[tuple[np.ndarray, str | np.ndarray]], n: int) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    for mask, reason in reasons:
        hit = (out == None) & mask  # noqa: E711 - elementwise test on an object array
        out[hit] = reason[hit] if isinstance(reason, np.ndarray) else reason
    return out


def _column(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    return table.column(name).combine_chunks()


def malformed_rows(schema: pa.Schema, reasons: list[str], raws: list[str]) -> pa.Table:
    """Staged rows for input that never became a row (a short CSV line, a line that is not
    JSON, a file skipped by `ingest.on_bad_file: skip`): every contract column null."""
    n = len(reasons)
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols[REASON] = pa.array(reasons, pa.string())
    cols[RAW] = pa.array(raws, pa.string())
    cols[DECODE_ERRORS] = pa.array(np.zeros(n, np.int32))
    return pa.table(cols, schema=staged_schema(schema))


PRIVATE_ID_COLUMNS = frozenset(
    {*ID_COLUMNS, "CustomerID", "InvoiceNo", "reviewerID", "reviewerName"}
)
"""Input columns (contract or source adapter names) that hold ids or names: in a reject's raw
row they are pseudonymized like the accepted ids when `privacy.pseudonymize_ids` is on."""


def raw_rows(table: pa.Table, mask: np.ndarray, rules: RowRules | None = None) -> pa.Array:
    """JSON of the input rows where `mask` holds (null elsewhere); Python per masked row only.

    With `rules`, the raw row obeys the privacy settings too: id columns hashed, text
    scrubbed, so `rejects/` holds nothing that `ingest/` may not.
    """
    out = np.full(table.num_rows, None, dtype=object)
    idx = np.flatnonzero(mask)
    if len(idx):
        sub = table.take(pa.array(idx))
        if rules is not None:
            sub = _private(sub, rules)
        out[idx] = [
            json.dumps(r, default=_json_default, ensure_ascii=False) for r in sub.to_pylist()
        ]
    return pa.array(out, pa.string())


def _private(table: pa.Table, rules: RowRules) -> pa.Table:
    for i, name in enumerate(table.column_names):
        col = table.column(i)
        if rules.id_key is not None and name in PRIVATE_ID_COLUMNS:
            table = table.set_column(i, name, pseudonymize(canonical_ids(col)[0], rules.id_key))
        elif rules.scrub_text and (
            pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        ):
            table = table.set_column(i, name, scrub_text(col.combine_chunks()))
    return table


def private_raw_text(raw: str, rules: RowRules) -> str:
    """A malformed line's raw JSON (`{"_file", "_line", "text"}`) under the privacy settings:
    its text cannot be split into fields, so with pseudonymized ids it is withheld."""
    if rules.id_key is None and not rules.scrub_text:
        return raw
    obj = json.loads(raw)
    if "text" in obj:
        if rules.id_key is not None:
            obj["text"] = "<withheld: privacy.pseudonymize_ids is on>"
        else:
            obj["text"] = scrub_text(pa.array([obj["text"]])).to_pylist()[0]
    return json.dumps(obj, ensure_ascii=False)


def _json_default(v: object) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def _ids(table: pa.Table, name: str, rules: RowRules) -> tuple[pa.Array, np.ndarray]:
    ids, flags = canonical_ids(_column(table, name))
    if rules.id_key is not None:
        ids = pseudonymize(ids, rules.id_key)
    return ids, flags


def _missing(ids: pa.Array) -> np.ndarray:
    return pc.is_null(ids).to_numpy(zero_copy_only=False)


def _finish(
    table: pa.Table,
    cols: dict[str, pa.Array],
    reasons: np.ndarray,
    flags: np.ndarray,
    schema: pa.Schema,
    source: pa.Table | None = None,
    rules: RowRules | None = None,
) -> pa.Table:
    """The staged table: contract columns, reason, raw input row (rejects only), decode flags.

    `source` is the row as read (before a source adapter renamed it), kept as the raw row of a
    reject; its `_decode_errors` column (bytes replaced while reading) adds to `flags`.
    """
    source = table if source is None else source
    if DECODE_ERRORS in source.column_names:
        read_flags = source.column(DECODE_ERRORS).to_numpy(zero_copy_only=False)
        flags = flags + read_flags.astype(np.int32)
        source = source.drop_columns([DECODE_ERRORS])
    rejected = reasons != None  # noqa: E711
    out = {}
    for f in schema:
        out[f.name] = cols[f.name].cast(f.type)
    out[REASON] = pa.array(reasons, pa.string())
    out[RAW] = raw_rows(source, rejected, rules)
    out[DECODE_ERRORS] = pa.array(flags.astype(np.int32), pa.int32())
    return pa.table(out, schema=staged_schema(schema))


def validate_transactions_table(
    table: pa.Table,
    rules: RowRules = RowRules(),
    source: pa.Table | None = None,  # noqa: B008
) -> pa.Table:
    """Normalise one table (one whole file, or a part of a parquet file) to the transactions
    contract; returns the staged table (`_reject_reason` null when accepted)."""
    n = table.num_rows
    customer_id, f1 = _ids(table, "customer_id", rules)
    order_id, f2 = _ids(table, "order_id", rules)
    ts = parse_ts(_column(table, "ts"), rules)
    amount, present = parse_numbers(_column(table, "amount"))
    finite = np.isfinite(amount)
    reasons = _first_reason(
        [
            (_missing(customer_id), "customer_id: missing or empty"),
            (_missing(order_id), "order_id: missing"),
            (ts.reason != None, ts.reason),  # noqa: E711
            (~present, "amount: missing"),
            (~finite, "amount: not a finite number"),
            (
                np.abs(np.where(finite, amount, 0)) > rules.max_abs_amount,
                f"amount: beyond ingest.max_abs_amount {rules.max_abs_amount:g}",
            ),
        ],
        n,
    )
    cols = {
        "customer_id": customer_id,
        "order_id": order_id,
        "ts": ts.ts,
        "amount": pa.array(amount, pa.float64()),
    }
    return _finish(table, cols, reasons, f1 + f2, TRANSACTIONS, source, rules)


def clean_text(values, rules: RowRules) -> tuple[pa.Array, np.ndarray]:
    """Review text decoded, truncated to `max_text_chars` (before any shuffle), scrubbed."""
    text, flags = decode_utf8(values)
    text = pc.fill_null(text, "")
    # truncate first (bounds the regex work), then again: a placeholder may be longer
    text = pc.utf8_slice_codeunits(text, 0, rules.max_text_chars)
    if rules.scrub_text:
        text = pc.utf8_slice_codeunits(scrub_text(text), 0, rules.max_text_chars)
    return text, flags


def validate_reviews_table(
    table: pa.Table,
    rules: RowRules = RowRules(),
    source: pa.Table | None = None,  # noqa: B008
) -> pa.Table:
    """Normalise one table to the reviews contract (staged form); text is never rejected."""
    n = table.num_rows
    customer_id, f1 = _ids(table, "customer_id", rules)
    review_id, f2 = _ids(table, "review_id", rules)
    order_id, f3 = _ids(table, "order_id", rules)
    product_id, f4 = canonical_ids(_column(table, "product_id"))
    ts = parse_ts(_column(table, "ts"), rules)
    text, f5 = clean_text(_column(table, "text"), rules)
    rating, present = parse_numbers(_column(table, "rating"))
    with np.errstate(invalid="ignore"):
        bad_rating = present & (
            np.isnan(rating) | (rating < 1) | (rating > 5) | (rating != np.round(rating))
        )
    reasons = _first_reason(
        [
            (_missing(customer_id), "customer_id: missing or empty"),
            (_missing(review_id), "review_id: missing"),
            (ts.reason != None, ts.reason),  # noqa: E711
            (bad_rating, "rating: not an integer in 1..5"),
        ],
        n,
    )
    ok_rating = present & ~bad_rating
    cols = {
        "customer_id": customer_id,
        "review_id": review_id,
        "ts": ts.ts,
        "text": text,
        "rating": pa.array(np.where(ok_rating, rating, 0).astype(np.int8), mask=~ok_rating),
        "order_id": order_id,
        "product_id": product_id,
    }
    return _finish(table, cols, reasons, f1 + f2 + f3 + f4 + f5, REVIEWS, source, rules)


def _to_frame(staged: pa.Table) -> pd.DataFrame:
    df = staged.to_pandas()
    df[REASON] = df[REASON].astype(object).where(df[REASON].notna(), None)
    return df


def validate_transactions(batch: pd.DataFrame, rules: RowRules = RowRules()) -> pd.DataFrame:  # noqa: B008
    """`validate_transactions_table` on a pandas batch, as pandas (for tests and adapters)."""
    return _to_frame(validate_transactions_table(_frame_to_table(batch), rules))


def validate_reviews(
    batch: pd.DataFrame, max_text_chars: int = 2000, rules: RowRules | None = None
) -> pd.DataFrame:
    """`validate_reviews_table` on a pandas batch, as pandas."""
    rules = rules or RowRules(max_text_chars=max_text_chars)
    return _to_frame(validate_reviews_table(_frame_to_table(batch), rules))


def _frame_to_table(df: pd.DataFrame) -> pa.Table:
    return pa.table({c: _as_array(df[c]) for c in df.columns})


def customers_schema(attributes: list[str]) -> pa.Schema:
    """The customers contract: `customer_id` plus the chosen attribute columns, all strings."""
    return pa.schema([(CUSTOMER_KEY, pa.string())] + [(a, pa.string()) for a in attributes])


def validate_customers_table(
    table: pa.Table,
    attributes: list[str],
    rules: RowRules = RowRules(),  # noqa: B008
    source: pa.Table | None = None,
) -> pa.Table:
    """Normalise one table to the customers contract; attribute values are never rejected.

    Attributes are categories: numbers become their text ("3", not "3.0"), blanks missing.
    """
    customer_id, flags = _ids(table, CUSTOMER_KEY, rules)
    reasons = _first_reason([(_missing(customer_id), "customer_id: missing or empty")], len(table))
    cols = {CUSTOMER_KEY: customer_id}
    for a in attributes:
        values, f = canonical_ids(_column(table, a))
        cols[a] = values
        flags = flags + f
    return _finish(table, cols, reasons, flags, customers_schema(attributes), source, rules)


def validate_customers(
    batch: pd.DataFrame,
    attributes: list[str],
    rules: RowRules = RowRules(),  # noqa: B008
) -> pd.DataFrame:
    return _to_frame(validate_customers_table(_frame_to_table(batch), attributes, rules))


def mark_duplicates(table: pa.Table, key: str, order_by: tuple[str, ...]) -> pa.Table:
    """Reject every accepted row whose `key` an earlier accepted row holds; the block holds
    every row of each key (after a hash shuffle on `key`).

    "Earlier" is by `order_by` (contract columns), so the row kept does not depend on the order
    in which the shuffle delivered rows. Vectorised: one sort, one adjacent comparison.
    """
    if table.num_rows == 0:
        return table
    ok_idx = np.flatnonzero(pc.is_null(table.column(REASON)).to_numpy(zero_copy_only=False))
    if len(ok_idx) < 2:
        return table
    sub = table.take(pa.array(ok_idx))
    order = pc.sort_indices(
        sub, sort_keys=[(key, "ascending")] + [(c, "ascending") for c in order_by]
    ).to_numpy()
    keys = sub.column(key).take(pa.array(order)).to_numpy(zero_copy_only=False)
    dup_sorted = np.zeros(len(order), bool)
    dup_sorted[1:] = keys[1:] == keys[:-1]
    dup_rows = np.zeros(table.num_rows, bool)
    dup_rows[ok_idx[order[dup_sorted]]] = True
    if not dup_rows.any():
        return table
    reasons = table.column(REASON).to_numpy(zero_copy_only=False).astype(object)
    reasons[dup_rows] = f"{key}: duplicate"
    raw = table.column(RAW).to_numpy(zero_copy_only=False).astype(object)
    contract_cols = [c for c in table.column_names if c not in (REASON, RAW, DECODE_ERRORS)]
    raw[dup_rows] = raw_rows(table.select(contract_cols), dup_rows).to_numpy(zero_copy_only=False)[
        dup_rows
    ]
    table = table.set_column(
        table.schema.get_field_index(REASON), REASON, pa.array(reasons, pa.string())
    )
    return table.set_column(table.schema.get_field_index(RAW), RAW, pa.array(raw, pa.string()))


def accepted_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The accepted rows of a staged table, typed exactly as the contract `schema` says."""
    return table.filter(pc.is_null(table.column(REASON))).select(schema.names).cast(schema)


def rejected_rows(table: pa.Table, name: str) -> pa.Table:
    """The rejected rows of a staged table: table name, reason, raw row."""
    rejected = table.filter(pc.is_valid(table.column(REASON)))
    return pa.table(
        {
            "table": pa.array([name] * rejected.num_rows, pa.string()),
            "reason": rejected.column(REASON).cast(pa.string()),
            "row": rejected.column(RAW).cast(pa.string()),
        },
        schema=REJECTS,
    )

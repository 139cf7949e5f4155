"""Reading inputs (parquet, CSV, JSON lines; local or s3://) and writing stage outputs with Ray Data.

Ingest reads with clvray's own per-file reader (`plan_parts`, `read_part`): every file is
checked before any work (parquet footer and schema, CSV header, first JSON line), a malformed
CSV row or JSON line becomes a bad row with its line number, and a truncated or corrupt file
raises `BadFileError` naming it. A CSV or JSON lines file is read whole by one task (the
day/month order of slash dates is decided per file), so very large text files should be split;
parquet files are cut into parts of at most `ingest.block_rows` rows by row groups.
"""

from __future__ import annotations

import csv as _csv_module
import json
import os
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clvray.storage import Storage

JSON_BLOCK_BYTES = 32 << 20


class InputError(ValueError):
    """An input path is missing or in a format clvray cannot read."""


def detect_format(uri: str) -> str:
    name = uri.rstrip("/").lower()
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".json", ".jsonl", ".ndjson")):
        return "json"
    return "parquet"


def read_input(
    uri: str,
    storage: Storage,
    string_columns: list[str] | None = None,
    all_strings: bool = False,
    json_strings: list[str] | None = None,
):
    """A lazy Ray Dataset over `uri` (a file or a folder of parquet / CSV / JSON lines files).

    CSV columns named in `string_columns` (every column of the first file's header with
    `all_strings`) are read as strings so that a bad value becomes a rejected row with its
    reason, not a read error for the whole file, and a code like "02139" keeps its zero.
    JSON lines columns named in `json_strings` are read as strings (other columns inferred).
    """
    import ray.data

    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    first = path
    if info.type == pafs.FileType.Directory:
        files = [
            f for f in storage.list_files(uri) if not f.rsplit("/", 1)[-1].startswith(("_", "."))
        ]
        if not files:
            raise InputError(f"input {uri} is an empty folder")
        first = files[0]
        fmt = detect_format(files[0])
    else:
        fmt = detect_format(uri)
    if fmt == "csv":
        names = list(string_columns or [])
        if all_strings:
            names += _csv_header(fs, first)
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in names},
            strings_can_be_null=True,
        )
        return ray.data.read_csv(path, filesystem=fs, convert_options=convert)
    if fmt == "json":
        # Arrow's reader takes JSON lines natively, with our filesystem (S3 endpoint_url);
        # Ray's `lines=True` path would ignore it. Named columns are strings whatever the
        # first block suggests; blocks are large enough for long review texts.
        import pyarrow.json as pajson

        schema = pa.schema([(c, pa.string()) for c in json_strings or []])
        return ray.data.read_json(
            path,
            filesystem=fs,
            read_options=pajson.ReadOptions(block_size=JSON_BLOCK_BYTES),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
    return _ray_read_parquet(path, fs)


def _csv_header(fs: pafs.FileSystem, path: str) -> list[str]:
    """Column names of a CSV file (compressed or not); reads its first block only."""
    with fs.open_input_stream(path, compression="detect") as src:
        return pacsv.open_csv(src).schema.names


def read_parquet(uri: str, storage: Storage, columns: list[str] | None = None):
    fs, path = storage.filesystem(uri)
    return _ray_read_parquet(path, fs, columns)


DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def _ray_read_parquet(path: str, fs: pafs.FileSystem, columns: list[str] | None = None):
    """`ray.data.read_parquet` through Ray Data's first parquet datasource, unless the user
    chose one with `RAY_DATA_USE_DATASOURCE_V2`.

    Ray 2.60's default (V2) lists every read through a fresh pool of `FooterReader` actors
    (up to 32, each a new Python process) before a row is read. A run reads parquet dozens of
    times, mostly small stage outputs: on 2 cores that pool was a quarter of a 400-customer
    behavioural run's CPU time, and evaluate took 10-20 s instead of 2 (bench/stage_overhead.py).
    The first datasource reads footers on the driver, or in tasks for many files."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if DATASOURCE_V2_ENV not in os.environ:
        ctx.use_datasource_v2 = False
    # Its file sampling (at creation) draws a progress bar of its own on the terminal: off
    # while the dataset is created, back on (if it was) for the dataset's executions.
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    finally:
        ctx.enable_progress_bars = bars
    ds.context.enable_progress_bars = bars
    return ds


def write_parquet(ds, uri: str, storage: Storage, schema: pa.Schema | None = None) -> None:
    """Replace whatever is at `uri` with `ds` as parquet files.

    Ray Data writes no file for an empty dataset; with `schema` given, an empty file is
    written instead, so that readers (and counts) always find the table.
    """
    storage.delete_dir(uri)
    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    ds.write_parquet(path, filesystem=fs)
    if schema is not None and not any(f.endswith(".parquet") for f in storage.list_files(uri)):
        pq.write_table(schema.empty_table(), f"{path}/empty.parquet", filesystem=fs)


def count_rows(uri: str, storage: Storage) -> int:
    """Rows in a parquet folder, from file footers only (no data read)."""
    fs, _ = storage.filesystem(uri)
    total = 0
    for f in storage.list_files(uri):
        if f.endswith(".parquet"):
            with fs.open_input_file(f) as src:
                total += pq.ParquetFile(src).metadata.num_rows
    return total


# ------------------------------------------------------------------ per-file reading for ingest


class BadFileError(InputError):
    """One input file is truncated, corrupt, or has a schema that differs from its siblings."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"{path}: {reason} (set ingest.on_bad_file: skip to skip such files and count them)"
        )
        self.path = path
        self.reason = reason

    def __reduce__(self):  # survives the trip from a Ray task to the driver
        return (BadFileError, (self.path, self.reason))


@dataclass(frozen=True)
class FilePart:
    """What one ingest read task reads: a whole CSV / JSON lines file, or row groups of a
    parquet file; or a bad file to be counted as skipped (`error`)."""

    path: str
    fmt: str
    columns: tuple[str, ...] = ()
    row_groups: tuple[int, ...] | None = None
    first_row: int = 0
    error: str | None = None

    def as_item(self) -> dict:
        return {"part": json.dumps(asdict(self))}

    @staticmethod
    def from_item(item: dict) -> FilePart:
        d = json.loads(item["part"])
        d["columns"] = tuple(d["columns"])
        d["row_groups"] = None if d["row_groups"] is None else tuple(d["row_groups"])
        return FilePart(**d)


def input_files(uri: str, storage: Storage) -> list[str]:
    """The data files at `uri` (a file, or a folder without `_`/`.` files), as fs paths."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        return [path]
    files = sorted(
        f for f in storage.list_files(uri) if not f.rsplit("/", 1)[-1].startswith(("_", "."))
    )
    if not files:
        raise InputError(f"input {uri} is an empty folder")
    return files


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    def norm(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_dictionary(t):
            return norm(t.value_type)
        return t

    return norm(a) == norm(b)


def _schema_difference(schema: pa.Schema, ref: pa.Schema) -> str | None:
    if set(schema.names) != set(ref.names):
        return f"columns {sorted(schema.names)} differ from {sorted(ref.names)}"
    for f in schema:
        other = ref.field(f.name).type
        if not _same_type(f.type, other):
            return f"column {f.name!r} is {f.type} here but {other} there"
    return None


def plan_parts(
    uri: str, storage: Storage, block_rows: int, on_bad_file: str
) -> tuple[list[FilePart], list[str]]:
    """Check every file at `uri` before any work and cut the input into read parts.

    Parquet: the footer of each file is read (a truncated or corrupt file fails here) and its
    schema compared with the first file's; row groups are grouped into parts of at most
    `block_rows` rows, so a large file is read by several tasks. CSV: the header of each file
    is read and compared. JSON lines: the first line is read. A bad file raises BadFileError
    naming it, or with `on_bad_file == "skip"` becomes a part that the read task counts as one
    rejected input. Returns the parts and the columns of the first good file.
    Cost: one footer / first block per file, on the driver.
    """
    fs, _ = storage.filesystem(uri)
    parts: list[FilePart] = []
    ref: tuple[str, pa.Schema | list[str]] | None = None
    columns: list[str] = []
    for path in input_files(uri, storage):
        fmt = detect_format(path)
        try:
            if fmt == "parquet":
                meta = _parquet_meta(fs, path)
                schema = meta.schema.to_arrow_schema()
                if ref is not None:
                    diff = _schema_difference(schema, ref[1])  # type: ignore[arg-type]
                    if diff:
                        raise BadFileError(path, f"schema differs from {ref[0]}: {diff}")
                else:
                    ref, columns = (path, schema), list(schema.names)
                parts.extend(_parquet_parts(path, meta, block_rows, tuple(schema.names)))
            elif fmt == "csv":
                header = _csv_header_checked(fs, path)
                if ref is not None and header != ref[1]:
                    raise BadFileError(path, f"CSV header {header} differs from {ref[0]}: {ref[1]}")
                if ref is None:
                    ref, columns = (path, header), list(header)
                parts.append(FilePart(path, fmt, tuple(header)))
            else:
                keys = _json_first_keys(fs, path)
                if ref is None:
                    ref, columns = (path, keys), keys
                parts.append(FilePart(path, fmt))
        except BadFileError as exc:
            if on_bad_file != "skip":
                raise
            parts.append(FilePart(path, fmt, error=exc.reason))
    return parts, columns


def _parquet_meta(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    try:
        with fs.open_input_file(path) as src:
            return pq.ParquetFile(src).metadata
    except (pa.ArrowException, OSError) as exc:
        raise BadFileError(
            path, f"not a readable parquet file (truncated or corrupt): {exc}"
        ) from exc


def _parquet_parts(
    path: str, meta: pq.FileMetaData, block_rows: int, names: tuple[str, ...]
) -> list[FilePart]:
    parts: list[FilePart] = []
    group: list[int] = []
    rows = first = 0
    start = 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if group and rows + n > block_rows:
            parts.append(FilePart(path, "parquet", names, tuple(group), first))
            group, rows, first = [], 0, start
        group.append(i)
        rows += n
        start += n
    if group or not parts:
        parts.append(FilePart(path, "parquet", names, tuple(group), first))
    return parts


def _csv_header_checked(fs: pafs.FileSystem, path: str) -> list[str]:
    try:
        with fs.open_input_stream(path, compression="detect") as src:
            line = b""
            while not line.endswith(b"\n"):
                chunk = src.read(1 << 16)
                if not chunk:
                    break
                line += chunk
                if b"\n" in line:
                    break
    except (pa.ArrowException, OSError) as exc:
        raise BadFileError(path, f"cannot be read ({exc})") from exc
    first = line.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    if not first.strip():
        raise BadFileError(path, "CSV file has no header line")
    return next(_csv_module.reader([first]))


def _json_first_keys(fs: pafs.FileSystem, path: str) -> list[str]:
    try:
        with fs.open_input_stream(path, compression="detect") as src:
            head = src.read(1 << 16)
    except (pa.ArrowException, OSError) as exc:
        raise BadFileError(path, f"cannot be read ({exc})") from exc
    for line in head.split(b"\n"):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return []
            return list(obj) if isinstance(obj, dict) else []
    return []


@dataclass
class ReadResult:
    """One part as read: its rows (text columns decoded), and input that never became a row."""

    table: pa.Table
    """Input columns (strings for CSV), `_line` (CSV / JSON) or `_row` (parquet), `_file`,
    and `_decode_errors` (values whose invalid UTF-8 was replaced)."""
    bad_reasons: list[str]
    bad_raws: list[str]


def read_part(
    part: FilePart, fs: pafs.FileSystem, json_strings: list[str] | None = None
) -> ReadResult:
    """Read one part with clvray's own error handling (no Ray).

    A CSV line with the wrong number of fields, or a JSON line that is not a JSON object,
    becomes a bad row with its line number; a file that cannot be decompressed or decoded at
    all raises BadFileError naming it. Text bytes are decoded as UTF-8 with replacement.
    """
    from clvray.contract import decode_utf8

    try:
        if part.fmt == "parquet":
            result = _read_parquet_part(part, fs)
        elif part.fmt == "csv":
            result = _read_csv_part(part, fs)
        else:
            result = _read_json_part(part, fs, json_strings or [])
    except BadFileError:
        raise
    except (pa.ArrowException, OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise BadFileError(part.path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    table = result.table
    flags = np.zeros(table.num_rows, np.int32)
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        t = col.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t):
            arr, f = decode_utf8(col)
            cols[name] = arr
            flags += f
        else:
            cols[name] = col
    cols["_file"] = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(table.num_rows, np.int32)), pa.array([part.path])
    )
    cols["_decode_errors"] = pa.array(flags)
    result.table = pa.table(cols)
    return result


def _read_parquet_part(part: FilePart, fs: pafs.FileSystem) -> ReadResult:
    with fs.open_input_file(part.path) as src:
        pf = pq.ParquetFile(src)
        table = pf.read_row_groups(list(part.row_groups or ()), use_threads=False)
    rows = np.arange(part.first_row, part.first_row + table.num_rows, dtype=np.int64)
    return ReadResult(table.append_column("_row", pa.array(rows)), [], [])


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression="detect") as src:
        return src.read()


def _read_csv_part(part: FilePart, fs: pafs.FileSystem) -> ReadResult:
    data = _read_all(fs, part.path)
    bad: list[tuple[int, str]] = []
    expected = len(part.columns)

    def on_invalid(row) -> str:
        bad.append((row.number, row.text))
        return "skip"

    table = pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(use_threads=False, block_size=16 << 20),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in part.columns},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    # Line numbers of the rows that parsed: 1 is the header; a quoted newline or a skipped
    # line shifts them, so only the bad lines carry exact numbers (from the parser).
    lines = np.arange(2, 2 + table.num_rows, dtype=np.int64)
    if bad:
        bad_lines = np.array(sorted(b[0] for b in bad if b[0] is not None), dtype=np.int64)
        lines = lines + np.searchsorted(bad_lines, lines, side="right")
    reasons, raws = [], []
    for number, text in bad:
        n_fields = len(next(_csv_module.reader([text]))) if text else 0
        reasons.append(f"csv: line has {n_fields} fields, the header {expected}")
        raws.append(json.dumps({"_file": part.path, "_line": number, "text": text}))
    return ReadResult(table.append_column("_line", pa.array(lines)), reasons, raws)


def _read_json_part(part: FilePart, fs: pafs.FileSystem, json_strings: list[str]) -> ReadResult:
    import pyarrow.json as pajson

    data = _read_all(fs, part.path)
    try:
        # The fast path: Arrow's reader over the whole file.
        schema = pa.schema([(c, pa.string()) for c in json_strings])
        table = pajson.read_json(
            pa.BufferReader(data),
            read_options=pajson.ReadOptions(use_threads=False, block_size=JSON_BLOCK_BYTES),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
        lines = _json_line_numbers(data)
        if len(lines) == table.num_rows:
            return ReadResult(table.append_column("_line", pa.array(lines)), [], [])
    except pa.ArrowInvalid:
        pass
    return _read_json_lines_slowly(part.path, data)


def _json_line_numbers(data: bytes) -> np.ndarray:
    """1-based numbers of the non-blank lines (the rows Arrow's reader returns), vectorised."""
    arr = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(arr)]])
    solid = np.concatenate([[0], np.cumsum(~np.isin(arr, (9, 10, 13, 32)))])
    nonblank = solid[stops] - solid[starts] > 0
    return np.flatnonzero(nonblank).astype(np.int64) + 1


def _read_json_lines_slowly(path: str, data: bytes) -> ReadResult:
    """A file Arrow's reader refused (a line that is not JSON, a field that changes type,
    invalid UTF-8): parsed line by line, every value as text, bad lines kept as rejects.
    Python per line, but only for files that need it."""
    rows: list[dict] = []
    line_numbers: list[int] = []
    reasons, raws = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            reasons.append(f"json: line is not valid JSON ({exc.msg})")
            raws.append(json.dumps({"_file": path, "_line": number, "text": text[:2000]}))
            continue
        if not isinstance(obj, dict):
            reasons.append("json: line is not a JSON object")
            raws.append(json.dumps({"_file": path, "_line": number, "text": text[:2000]}))
            continue
        rows.append({k: _json_text(v) for k, v in obj.items()})
        line_numbers.append(number)
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = {k: pa.array([r.get(k) for r in rows], pa.string()) for k in names}
    cols["_line"] = pa.array(line_numbers, pa.int64())
    return ReadResult(pa.table(cols), reasons, raws)


def _json_text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)

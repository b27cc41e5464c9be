"""The artifact store: one root (local folder or any pyarrow.fs URI) shared by every stage.

Layout, one folder per stage:

    <root>/<stage>/MANIFEST.json          the published version: config, inputs, versions, metrics, files
    <root>/<stage>/v-<time>-<id>/...      one folder per run of the stage

A run writes into a fresh version folder and publishes by writing MANIFEST.json last, in one put
(an atomic rename locally; a single-object PUT on S3/GCS). A reader resolves the manifest first, so it
never sees a half-written stage, and a crashed run leaves the previous version in place. Older version
folders are kept until `prune`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform as _platform
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "MANIFEST.json"
_TRACKED_LIBS = ("sidrec", "ray", "torch", "transformers", "pyarrow", "numpy", "sentence-transformers")


def library_versions() -> dict[str, str]:
    out = {"python": _platform.python_version()}
    for name in _TRACKED_LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(obj: Any) -> str:
    """Stable short hash of JSON-able data (configs, input fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """Content hash of an input file or folder (all files below it, in name order)."""
    fs, p = resolve_fs(path)
    h = hashlib.sha256()
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    files = [info] if info.type == pafs.FileType.File else sorted(
        (i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File),
        key=lambda i: i.path,
    )
    for f in files:
        h.update(f.path[len(p):].encode())
        with fs.open_input_stream(f.path) as s:
            while chunk := s.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def resolve_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow.fs URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


@dataclass
class StageRun:
    """A stage version being written. Write under `path` (use `store.fs`), then `store.publish(run, ...)`."""

    stage: str
    version: str
    path: str


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = resolve_fs(root)
        self.fs.create_dir(self.base, recursive=True)

    # -- paths -------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        return f"{self.base}/{stage}"

    # -- manifests ---------------------------------------------------------------------------------
    def manifest(self, stage: str) -> dict | None:
        """The published manifest of a stage, or None if it was never published."""
        path = f"{self.stage_dir(stage)}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return json.loads(self.read_bytes(path))

    def require(self, stage: str) -> dict:
        m = self.manifest(stage)
        if m is None:
            raise FileNotFoundError(
                f"stage {stage!r} has not been built in artifact store {self.root!r}; run the stage that makes it"
            )
        return m

    def current_path(self, stage: str) -> str:
        """Folder of the published version of a stage."""
        return f"{self.stage_dir(stage)}/{self.require(stage)['version']}"

    def is_current(self, stage: str, fp: str) -> bool:
        m = self.manifest(stage)
        return m is not None and m.get("fingerprint") == fp

    # -- writing -----------------------------------------------------------------------------------
    def begin(self, stage: str) -> StageRun:
        # sortable by creation time to the microsecond (prune relies on it), unique by the random suffix
        now = time.time_ns()
        version = time.strftime("v-%Y%m%d-%H%M%S", time.gmtime(now // 10**9)) + f"{now // 1000 % 10**6:06d}-" \
            + uuid.uuid4().hex[:6]
        path = f"{self.stage_dir(stage)}/{version}"
        self.fs.create_dir(path, recursive=True)
        return StageRun(stage, version, path)

    def publish(self, run: StageRun, *, fp: str, config: Any, inputs: dict[str, str],
                metrics: dict | None = None) -> dict:
        """Make `run` the stage's current version: write its manifest last, atomically."""
        files = sorted(
            i.path[len(run.path) + 1:]
            for i in self.fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
            if i.type == pafs.FileType.File
        )
        manifest = {
            "stage": run.stage,
            "version": run.version,
            "fingerprint": fp,
            "config": config,
            "inputs": inputs,
            "libraries": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": metrics or {},
            "files": files,
        }
        self.write_bytes(f"{self.stage_dir(run.stage)}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        return manifest

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file so that readers see the old or the new content, never a part."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # object stores: a single PUT is atomic
            with self.fs.open_output_stream(path) as s:
                s.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as s:
            return s.read()

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_table(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(path, buf.getvalue())

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def prune(self, stage: str, keep: int = 2) -> list[str]:
        """Delete all but the newest `keep` version folders of a stage (never the published one)."""
        current = (self.manifest(stage) or {}).get("version")
        infos = self.fs.get_file_info(pafs.FileSelector(self.stage_dir(stage), allow_not_found=True))
        versions = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
        removed = []
        for v in versions[: max(0, len(versions) - keep)]:
            if v != current:
                self.fs.delete_dir(f"{self.stage_dir(stage)}/{v}")
                removed.append(v)
        return removed

    # -- typed readers of published stages -----------------------------------------------------------
    def titles(self) -> dict[str, str]:
        """item_id -> title of the published catalog."""
        cat = self.read_table(f"{self.current_path('dataset')}/catalog.parquet", columns=["item_id", "title"])
        return dict(zip(cat["item_id"].to_pylist(), cat["title"].to_pylist(), strict=True))

    def profiles(self) -> dict[str, str]:
        """user_id -> free-text profile ({} when the dataset has none)."""
        if "profiles.parquet" not in self.require("dataset").get("files", []):
            return {}
        prof = self.read_table(f"{self.current_path('dataset')}/profiles.parquet")
        return dict(zip(prof["user_id"].to_pylist(), prof["profile"].to_pylist(), strict=True))

    def sid_table(self, columns: list[str] | None = None) -> pa.Table:
        """The published SIDs: item_id, codes, sid."""
        return self.read_table(f"{self.current_path('sids')}/sids.parquet", columns=columns)

    def sid_map(self) -> dict[str, str]:
        """item_id -> SID string."""
        t = self.sid_table(["item_id", "sid"])
        return dict(zip(t["item_id"].to_pylist(), t["sid"].to_pylist(), strict=True))

    def split(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Examples of a split (train / valid / test) of the published dataset."""
        return self.read_table(f"{self.current_path('dataset')}/{name}.parquet", columns=columns)

    # -- folders as local directories ----------------------------------------------------------------
    @contextlib.contextmanager
    def local_dir(self, path: str) -> Iterator[str]:
        """``path`` as a local folder: itself on a local store, else a temporary copy (removed on exit)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="sidrec-") as tmp:
            pafs.copy_files(path, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield tmp

    def upload_dir(self, local: str, dest: str) -> None:
        """Copy a local folder to ``dest`` in the store (nothing to do when it already is ``dest``)."""
        if isinstance(self.fs, pafs.LocalFileSystem) and os.path.abspath(local) == os.path.abspath(dest):
            return
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def fetch_model_dir(self, dest: str | None = None) -> str:
        """A local folder holding the published ``model`` stage (the store folder itself when local)."""
        path = self.current_path("model")
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        dest = dest or tempfile.mkdtemp(prefix="sidrec-model-")
        pafs.copy_files(path, dest, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return dest

"""The catalog change log: every add, update and retire after the store was built, in the artifact store.

Layout, next to the stages (the same root, local folder or pyarrow.fs URI):

    <root>/catalog/changes/000000001.json     change 1: {"version", "basis", "created", "writer", "entries"}
    <root>/catalog/changes/000000002.json     ...
    <root>/catalog/HEAD.json                  {"version": <latest>}: a hint, so a poll reads one small file

A change is one admin write (a POST /v1/items, a retire, a chunk of a CLI file): a list of entries, each
``{"op": "add" | "update", "item_id", "fields", "codes", "sid", "exact", "embedding"}`` or ``{"op":
"retire", "item_id"}``. The catalog at version v is the published ``sids`` stage plus changes 1..v applied
in order (``sidrec.catalog.state``). ``basis`` names the stage versions the change's SIDs were assigned
against (embeddings, quantizer, sids, model): a replica serving other versions re-encodes instead.

Publishing is create-exclusive, so two writers (two replicas, a replica and the CLI) never get the same
version: a change is written complete to a temporary file and then *linked* to its version's name, which
fails if that name exists (``os.link``: atomic, and a reader never sees a partial file); the loser gets
``VersionConflict``, catches up and retries (``sidrec.catalog.writer``). There are no holes: a writer
takes version v+1 only after reading v. HEAD is updated after the change (atomic replace); it may lag or,
with racing writers, step back, so readers probe the versions after it until one is missing. Object stores
(``s3://``, ``gs://``) have no create-exclusive through pyarrow: there a change is put if absent and read
back to check it is ours, which leaves a race of about one round trip between two writers of the same
version; run one writer at a time against an object store (or put the store on a shared filesystem).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.fs as pafs

from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)

CATALOG_DIR = "catalog"
HEAD = "HEAD.json"
Op = Literal["add", "update", "retire"]
OPS = ("add", "update", "retire")


class VersionConflict(RuntimeError):
    """Another writer published this version first: catch up and try the next one."""

    def __init__(self, version: int):
        self.version = version
        super().__init__(f"catalog version {version} was published by another writer")


@dataclass
class Entry:
    """One item's change. ``fields`` are the catalog row (title, brand, categories, description);
    ``embedding`` is the item text's embedding (base64 float32), so that a replica re-assigning the SID
    under other stage versions starts from the same vector as the writer."""

    op: Op
    item_id: str
    fields: dict[str, str] = field(default_factory=dict)
    codes: list[int] = field(default_factory=list)
    sid: str = ""
    exact: bool = True
    embedding: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.op == "retire":
            return {"op": self.op, "item_id": self.item_id}
        return {"op": self.op, "item_id": self.item_id, "fields": self.fields, "codes": self.codes,
                "sid": self.sid, "exact": self.exact, "embedding": self.embedding}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        if d.get("op") not in OPS or not isinstance(d.get("item_id"), str):
            raise ValueError(f"bad catalog entry {str(d)[:200]}")
        return cls(d["op"], d["item_id"], dict(d.get("fields") or {}), [int(c) for c in d.get("codes") or []],
                   d.get("sid", ""), bool(d.get("exact", True)), d.get("embedding", ""))


@dataclass
class Change:
    """A published change: version, the stage versions it was made against, its entries."""

    version: int
    entries: list[Entry]
    basis: dict[str, str] = field(default_factory=dict)
    writer: str = ""
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "basis": self.basis, "writer": self.writer, "created": self.created,
                "entries": [e.to_json() for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Change:
        return cls(int(d["version"]), [Entry.from_json(e) for e in d["entries"]], dict(d.get("basis") or {}),
                   d.get("writer", ""), d.get("created", ""))


class CatalogLog:
    """Reads and appends the change log of one artifact store."""

    def __init__(self, store: ArtifactStore | str):
        self.store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        self.dir = f"{self.store.base}/{CATALOG_DIR}"
        self.changes_dir = f"{self.dir}/changes"

    def path(self, version: int) -> str:
        return f"{self.changes_dir}/{version:09d}.json"

    def _exists(self, version: int) -> bool:
        return self.store.fs.get_file_info(self.path(version)).type == pafs.FileType.File

    # ------------------------------------------------------------------------------------ reading
    def head(self, at_least: int = 0) -> int:
        """The latest published version (0 for an empty log): the HEAD hint, then probing forward."""
        v = max(self._head_hint(), at_least)
        while v > 0 and not self._exists(v):  # a hint ahead of the files: only if files were deleted
            v -= 1
        while self._exists(v + 1):
            v += 1
        return v

    def _head_hint(self) -> int:
        try:
            return int(self.store.read_json(f"{self.dir}/{HEAD}")["version"])
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return 0

    def read(self, version: int) -> Change:
        change = Change.from_json(self.store.read_json(self.path(version)))
        if change.version != version:
            raise ValueError(f"{self.path(version)} holds version {change.version}")
        return change

    def changes(self, after: int = 0, upto: int | None = None) -> Iterator[Change]:
        """Changes after..upto (default: the head), in order."""
        upto = self.head(after) if upto is None else upto
        for v in range(after + 1, upto + 1):
            yield self.read(v)

    # ------------------------------------------------------------------------------------ writing
    def append(self, change: Change) -> Change:
        """Publish ``change`` as its version (which must be head + 1); durable when this returns.
        Raises VersionConflict when another writer has that version."""
        if change.version < 1:
            raise ValueError("catalog versions start at 1")
        if change.version > 1 and not self._exists(change.version - 1):
            raise ValueError(f"catalog version {change.version - 1} does not exist: versions have no holes")
        change.created = change.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = json.dumps(change.to_json(), separators=(",", ":")).encode()
        self.store.fs.create_dir(self.changes_dir, recursive=True)
        if not self._create_exclusive(self.path(change.version), data):
            raise VersionConflict(change.version)
        if self._head_hint() < change.version:
            with contextlib.suppress(OSError):  # only a hint: readers probe past it
                self.store.write_json(f"{self.dir}/{HEAD}", {"version": change.version})
        return change

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``path`` with ``data`` unless it exists; True when this call created it."""
        if isinstance(self.store.fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)      # atomic, fails if path exists; readers see all of it or nothing
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return True
        if self.store.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        self.store.write_bytes(path, data)   # a single PUT; then check that no other writer's put won
        return self.store.read_bytes(path) == data


def _fsync_dir(path: str) -> None:
    """Make a new directory entry durable (the link above), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

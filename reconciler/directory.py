"""The directory source: ModelDeployments and the objects they point at, from YAML files.

The embedded default (`overspill serve --manifests DIR`). Files are compared by inode,
size and mtime every `poll_interval`, so an add, change or delete is seen within a
fraction of a second without inotify; each file is an origin in the store, so a broken
file affects only its own objects.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from reconciler.documents import parse_documents
from reconciler.store import ObjectStore

log = logging.getLogger("overspill.source")
SUFFIXES = (".yaml", ".yml", ".json")


class DirectorySource:
    def __init__(self, root: Path, store: ObjectStore, poll_interval: float = 0.25):
        self.root = root
        self.store = store
        self.poll_interval = poll_interval
        self._seen: dict[Path, tuple[int, int, int]] = {}

    def files(self) -> dict[Path, tuple[int, int, int]]:
        found = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix in SUFFIXES and not any(
                p.startswith(".") for p in path.relative_to(self.root).parts
            ):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # removed between listing and stat
                found[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return found

    def sync(self) -> bool:
        """Load what changed since the last call; True when anything did."""
        current = self.files()
        changed = False
        for path in self._seen.keys() - current.keys():
            self.store.remove_origin(str(path))
            log.info("event=file_removed file=%s", path)
            changed = True
        for path, stamp in current.items():
            if self._seen.get(path) == stamp:
                continue
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                log.error("event=file_unreadable file=%s error=%r", path, str(exc))
                continue
            objects, rejected = parse_documents(text, str(path))
            self.store.replace_origin(str(path), objects, rejected)
            for r in rejected:
                for err in r.errors:
                    log.error("event=invalid_object file=%s error=%r", path, err)
            log.info("event=file_loaded file=%s objects=%d rejected=%d", path, len(objects), len(rejected))
            changed = True
        self._seen = current
        return changed

    async def run(self) -> None:
        if not self.root.is_dir():
            raise SystemExit(f"--manifests {self.root}: not a directory")
        while True:
            self.sync()
            await asyncio.sleep(self.poll_interval)

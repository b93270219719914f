"""The `--cache-dir` of autocompress: proxy tables and measured candidates, kept so that a
second run (after a crash, a Ctrl-C, a time budget that ran out, or with another budget)
starts where the last one stopped.

Layout: `<cache_dir>/<key>/proxies.json` and `<key>/candidates.json`, where `<key>` hashes
the input model's bytes, the calibration and verify data (file contents, or the spec text
for `random:N`), and every option that changes what is built or measured (the decision
space, backend, threads, input shapes). The budget and the seed are not in the key: they
change what the search looks at, not what a measurement gives. Files are written
atomically (safe_write), so an interrupted run leaves the previous state.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..safe_write import write_json

VERSION = 3  # 2: sizes are those of the written file; 3: prune proxies from the probe


def _digest_source(spec: Any, h: Any) -> None:
    if isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
        path = Path(spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    else:
        h.update(repr(spec).encode())


def cache_key(model_bytes: bytes, calibration: Any, verify_data: Any,
              options: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(f"v{VERSION}".encode())
    h.update(model_bytes)
    _digest_source(calibration, h)
    h.update(b"|verify|")
    _digest_source(verify_data, h)
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class Cache:
    """Reads and writes one key's folder; `folder=None` keeps everything in memory."""

    def __init__(self, folder: str | os.PathLike | None, key: str):
        self.path = Path(folder) / key if folder is not None else None
        self.key = key
        self.candidates: dict[str, dict[str, Any]] = {}
        self.proxies: dict[str, Any] | None = None
        if self.path is not None:
            self.proxies = self._read("proxies.json")
            self.candidates = self._read("candidates.json") or {}
        self.resumed = len(self.candidates)

    def _read(self, name: str) -> Any:
        file = self.path / name
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError):
            return None  # a damaged cache is measured again, never trusted

    def _write(self, name: str, data: Any) -> None:
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / name, data, label="autocompress cache")

    def save_proxies(self, data: dict[str, Any]) -> None:
        self.proxies = data
        self._write("proxies.json", data)

    def add_candidate(self, policy_key: str, record: dict[str, Any]) -> None:
        self.candidates[policy_key] = record
        self._write("candidates.json", self.candidates)

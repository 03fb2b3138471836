"""Persistent request cache: pay once per (item, model, prompt version, payload).

`CachedBackend` wraps any backend. Before a run it looks every request up by `cache_key` (item id,
model, prompt version, and a hash of messages + images + schema + sampling parameters); only misses go
to the wrapped backend, and each successful response is committed the moment it arrives. Failures are
never stored, so a rerun retries exactly the failed rows, and editing a prompt (new text or new
`prompt_version`) pays only for the rows whose key changed.

Storage is one SQLite file (stdlib) in WAL mode: a process killed with SIGKILL loses at most the
response being written, never the file; several shard processes may share one file (readers never block
the writer; writers wait on `busy_timeout`). Sharded runs write one file per machine
(``requests-<i>of<n>.sqlite``, SQLite locks do not work on network file systems); every cache also
*reads* its sibling ``requests*.sqlite`` files (read-only), so a rerun with another number of shards
still finds every answer paid for. Keys hold no shard, host or API key: only what the model was asked.

The cache stores ids, model names, prompt versions and output texts: never a key or a header.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lvr.backends.base import Backend, OnResponse, Request, Response, cache_key
from lvr.backends.usage import Usage

log = logging.getLogger(__name__)
SIBLING_GLOB = "requests*.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    item_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    texts TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    created_at REAL NOT NULL
)
"""
_LOOKUP_CHUNK = 500  # stays under SQLite's bound-parameter limit


class RequestCache:
    """SQLite store of successful responses keyed by `cache_key`.

    Args:
        path: Database file, e.g. `<run>/cache/requests.sqlite` (parents are created).
        read_siblings: Also look keys up in the other `SIBLING_GLOB` files of the folder.
    """

    def __init__(self, path: str | Path, read_siblings: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: `run_sync` may drive the backend from a helper thread; the lock
        # serializes our own use of the connection.
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (not a power cut) without an fsync per row.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.commit()
        self._siblings = _open_siblings(self.path) if read_siblings else []

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[list[str], int, float]]:
        """Look keys up.

        Args:
            keys: Cache keys.

        Returns:
            key -> (texts, attempts, latency_s) for the keys present.
        """
        found: dict[str, tuple[list[str], int, float]] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            _lookup(self._conn, unique, found)
            for name, conn in list(self._siblings):
                missing = [k for k in unique if k not in found]
                if not missing:
                    break
                try:
                    _lookup(conn, missing, found)
                except sqlite3.Error as exc:  # a sibling being replaced or unreadable: a miss
                    log.warning("request cache %s not readable (%s); ignoring it", name, exc)
                    self._siblings.remove((name, conn))
        return found

    def put(self, key: str, req: Request, resp: Response, model: str) -> None:
        """Store one successful response and commit (failures are ignored by design).

        Args:
            key: Its cache key.
            req: The request.
            resp: The response.
            model: Backend model name.
        """
        if resp.error is not None or resp.cached:
            return
        row = (
            key,
            req.item_id,
            model,
            req.prompt_version,
            json.dumps(resp.texts),
            resp.attempts,
            resp.latency_s,
            time.time(),
        )
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?)", row)
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close the connections."""
        with self._lock:
            self._conn.close()
            for _, conn in self._siblings:
                conn.close()
            self._siblings = []


def _lookup(
    conn: sqlite3.Connection, keys: list[str], found: dict[str, tuple[list[str], int, float]]
) -> None:
    """Add the rows of ``keys`` present in ``conn`` to ``found``."""
    for i in range(0, len(keys), _LOOKUP_CHUNK):
        chunk = keys[i : i + _LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key, texts, attempts, latency_s FROM responses WHERE key IN ({marks})"
        for key, texts, attempts, latency in conn.execute(sql, chunk):
            found[key] = (json.loads(texts), attempts, latency)


def _open_siblings(path: Path) -> list[tuple[str, sqlite3.Connection]]:
    """Read-only connections to the other request caches of ``path``'s folder.

    Those of a run with another number of shards hold answers this one may need. Files that do
    not open (not SQLite, no responses table, a file system without locks) are skipped with a
    warning: they cost misses, never a failed run.
    """
    out = []
    for other in sorted(path.parent.glob(SIBLING_GLOB)):
        if other.resolve() == path.resolve():
            continue
        try:
            conn = sqlite3.connect(
                f"{other.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                check_same_thread=False,
            )  # fmt: skip
            conn.execute("SELECT key FROM responses LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            if "no such table" not in str(exc):  # else: another worker is creating it right now
                log.warning("request cache %s not readable (%s); ignoring it", other, exc)
            continue
        out.append((other.name, conn))
    return out


class CachedBackend:
    """A Backend that answers from a `RequestCache` and forwards only the misses.

    Args:
        backend: The wrapped backend.
        cache_path: SQLite file of the cache.
    """

    def __init__(self, backend: Backend, cache_path: str | Path):
        self.backend = backend
        self.name = backend.name
        self.model = backend.model
        self.cache = RequestCache(cache_path)
        self.last_hits = 0
        self.usage = Usage()  # every response this backend returned, hits included
        # The wrapped backend's request budget, if it has one (for manifests).
        self.limiter = getattr(backend, "limiter", None)

    def run(
        self,
        requests: Sequence[Request],
        progress: bool = True,
        on_response: OnResponse | None = None,
    ) -> list[Response]:
        """Serve hits from the cache, run the misses, store successes as they arrive.

        Args:
            requests: The requests.
            progress: Show a progress bar for the misses.
            on_response: Called with (index into `requests`, response) for every row, hits first.

        Returns:
            One Response per request, in order; hits have `cached=True` and `attempts=0`.
        """
        keys = [cache_key(r, self.model) for r in requests]
        found = self.cache.get_many(keys)
        results: list[Response | None] = [None] * len(requests)
        misses: list[int] = []
        for i, (req, key) in enumerate(zip(requests, keys, strict=True)):
            if key in found:
                texts, _attempts, latency = found[key]
                results[i] = Response(req.item_id, texts, None, 0, latency, cached=True)
                if on_response is not None:
                    on_response(i, results[i])
            else:
                misses.append(i)
        self.last_hits = len(requests) - len(misses)

        reported: set[int] = set()

        def store(j: int, resp: Response) -> None:
            i = misses[j]
            reported.add(j)
            self.cache.put(keys[i], requests[i], resp, self.model)
            if on_response is not None:
                on_response(i, resp)

        if misses:
            fresh = self.backend.run([requests[i] for i in misses], progress, on_response=store)
            for j, (i, resp) in enumerate(zip(misses, fresh, strict=True)):
                results[i] = resp
                if j not in reported:  # a backend that ignores on_response: store at the end
                    store(j, resp)
        out = [r for r in results if r is not None]
        self.usage.record_all(out)
        return out

    def close(self) -> None:
        """Close the cache file."""
        self.cache.close()

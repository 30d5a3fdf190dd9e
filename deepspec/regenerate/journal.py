"""Append-only journal: one JSON line per finished record, fsync'd before the record counts as done.

Layout: the first line is a header ``{"deepspec_journal": 1, "fingerprint": {...}}``; every other
line is a finished output record (with its input ``index``). A re-run reads the journal, skips the
records it holds, and appends the rest. The journal tolerates a SIGKILL at any moment: a torn last
line (no trailing newline, or not JSON) is cut off before appending.

Writes go through one background thread that does *group commit*: it takes every record queued so
far, writes them, flushes and fsyncs once (the event loop hands records over once per loop
iteration, not once per record). A record is journaled (and will never be re-sent) only
after its fsync returned, and the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any

MAGIC = "deepspec_journal"
VERSION = 1


class JournalMismatch(RuntimeError):
    """The journal was started with other inputs or settings than the current run."""


def _describe(value: Any) -> str:
    s = json.dumps(value, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def load_journal(
    path: Path, *, repair: bool = True
) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """Read a journal: (header or None, entries by index).

    With ``repair`` a torn last line is cut off the file (so that appends start clean); without it
    the file is only read (a torn line is ignored).
    """
    if not path.exists():
        return None, {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not repair:
        data = data[:end]
    elif end < len(data):  # torn tail from a crash mid-write
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        data = data[:end]
    header: dict[str, Any] | None = None
    entries: dict[int, dict[str, Any]] = {}
    for n, raw in enumerate(data.splitlines()):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # only possible for a line torn by a crash and later completed by garbage
        if n == 0 and isinstance(obj, dict) and MAGIC in obj:
            header = obj
            continue
        if isinstance(obj, dict) and isinstance(obj.get("index"), int):
            entries[obj["index"]] = obj
    return header, entries


def check_fingerprint(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume when the input or a key setting changed since the journal was started."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # name the nested keys that differ
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    lines.append(
                        f"  {k}.{sub}: journal has {_describe(a.get(sub))}, this run has {_describe(b.get(sub))}"
                    )
        else:
            lines.append(f"  {k}: journal has {_describe(a)}, this run has {_describe(b)}")
    if lines:
        raise JournalMismatch(
            f"the journal {path} was started with different inputs or settings:\n"
            + "\n".join(lines)
            + "\nre-run with the original settings to resume, or pass --restart to discard the journal"
            " and regenerate everything"
        )


class JournalWriter:
    """Appends records to a journal from a background thread (group commit, fsync per batch).

    With ``lock`` the writer holds an exclusive ``flock`` on the file while open: a worker process
    does so, and the parent of a later run waits for that lock before folding the worker's journal
    (so a stray worker can never write into a journal that is being folded).
    """

    def __init__(
        self,
        path: Path,
        fingerprint: dict[str, Any],
        *,
        lock: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        fresh = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()
        if lock:
            import fcntl

            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise RuntimeError(f"the journal {path} is in use by another process") from None
        if fresh:
            self._write([{MAGIC: VERSION, "fingerprint": fingerprint, **(extra or {})}])
        # Items: a list of records, a sync() barrier, or None (stop).
        self._queue: queue.SimpleQueue[list[dict[str, Any]] | threading.Event | None] = queue.SimpleQueue()
        self._pending: list[dict[str, Any]] = []  # appended in this event-loop iteration
        self._scheduled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="journal-writer", daemon=True)
        self._thread.start()

    def _write(self, records: list[dict[str, Any]]) -> None:
        payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        self._file.write(payload)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                stop = True
            records = [r for item in batch if isinstance(item, list) for r in item]
            if records:
                try:
                    self._write(records)
                except BaseException as e:  # surfaced by append()/close()/sync()
                    self._error = e
            for r in batch:  # sync() barriers: everything queued before them is on disk now
                if isinstance(r, threading.Event):
                    r.set()
            if self._error is not None:
                return

    def append(self, record: dict[str, Any]) -> None:
        """Queue a record. Inside an event loop, the records of one loop iteration are handed to the
        writer thread together (one cross-thread hand-off instead of one per record)."""
        if self._error is not None:
            raise RuntimeError(f"cannot write the journal {self.path}: {self._error}") from self._error
        self._pending.append(record)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_off()
            return
        self._scheduled = True
        loop.call_soon(self._hand_off)

    def _hand_off(self) -> None:
        self._scheduled = False
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def sync(self, timeout_s: float = 60.0) -> None:
        """Block until every record appended so far is written and fsync'd."""
        self._hand_off()
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"cannot write the journal {self.path}: {self._error or 'timeout'}")

    def close(self) -> None:
        self._hand_off()
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None:
            raise RuntimeError(f"cannot write the journal {self.path}: {self._error}") from self._error

"""Client worker processes: ``deepspec regenerate --workers N``.

One Python process spends ~0.6-1.3 ms of CPU per request in the ``openai`` client and its aiohttp
transport, so it tops out near 800-1,700 requests/s whatever the servers could give
(``bench/regen_latency.py``). ``--workers N`` starts N processes
(``python -m deepspec.regenerate.workers``) that send this run's unfinished records to the same
endpoints, with the per-endpoint concurrency split between them.

Work is handed out by the parent, in chunks, on request (guided self-scheduling): a worker writes
``N`` on its stdout when its queue runs low and the parent answers ``W i j k ...`` (input indices) on
the worker's stdin, ``W`` alone when nothing is left. A chunk is a quarter of an even share of what
is left, capped by the worker's concurrency, so chunks shrink towards the end and the workers finish
together. Nothing is handed out before every worker has asked once (or ended), so they also start
sending together, after their start-up (imports, endpoint probe).

Crash safety reuses the journal machinery:

* the parent journals bad input itself (it needs no request) and hands out only conversations;
* each worker appends its finished records to its own journal
  ``<base>.worker-<w>-of-<N>.journal.jsonl`` (same fingerprint as the run, plus the worker id) and
  holds an exclusive ``flock`` on it while alive; a worker dies with its parent (``PR_SET_PDEATHSIG``
  on Linux, and a parent watchdog everywhere);
* the parent (after its workers end, or on the next run after a SIGKILL of anyone) *folds* every
  worker journal into the run's journal: it waits for the worker's lock, appends the records it
  does not hold yet, fsyncs, and only then deletes the worker journal. Records are keyed by input
  index, so a crash between the append and the delete cannot duplicate one. Records handed to a
  worker that dies unfinished are simply not journaled: the run fails and a re-run sends them.

The output is then written by the parent from its journal, in input order, exactly as with one
process; the number of workers is not part of the fingerprint and may change between resumes.
Workers report progress and their final statistics as lines on their stdout (``P records tokens``
every 0.25 s, ``S {json}`` at the end); their logs go to the shared stderr.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepspec.regenerate.job import RegenerationError, RegenerationJob, load_items
from deepspec.regenerate.journal import JournalMismatch, JournalWriter, check_fingerprint, load_journal
from deepspec.regenerate.send import install_uvloop, open_pool, send_records
from deepspec.regenerate.shards import OutputPaths

log = logging.getLogger("deepspec.regenerate")

AUTO_CONNECTIONS_PER_WORKER = 64  # `--workers auto`: one process per this many concurrent requests
LOCK_WAIT_S = 30.0


# --------------------------------------------------------------------------------------------------
# Shared by parent and workers
# --------------------------------------------------------------------------------------------------


def worker_journal(paths: OutputPaths, w: int, n: int) -> Path:
    return Path(f"{paths.base}.worker-{w}-of-{n}.journal.jsonl")


def worker_journals(paths: OutputPaths) -> list[Path]:
    """Worker journals of this output (any worker count), oldest first."""
    base = Path(paths.base)
    return sorted(base.parent.glob(f"{base.name}.worker-*-of-*.journal.jsonl"))


def auto_workers(concurrency: int, endpoints: int, cpus: int | None = None) -> int:
    """``--workers auto``: one process per 64 concurrent requests, at most one per CPU core."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(cpus, -(-concurrency * max(1, endpoints) // AUTO_CONNECTIONS_PER_WORKER)))


def effective_workers(job: RegenerationJob, todo: int) -> int:
    """Workers actually started: never more than the records to send or the concurrency."""
    return max(1, min(job.workers, todo, job.settings.concurrency))


def concurrency_share(total: int, w: int, n: int) -> int:
    """Worker ``w``'s part of a per-endpoint concurrency ``total`` (the parts sum to ``total``)."""
    return total // n + (1 if w < total % n else 0)


@dataclass
class RunStats:
    """Request statistics of a run, summed over its workers."""

    requests: int = 0
    retries: int = 0
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 1
    cpu_s: float = 0.0  # process CPU time spent sending (all processes; start-up not included)
    send_start: float | None = None  # epoch seconds: first process starts sending
    send_end: float | None = None  # epoch seconds: last process done
    windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each process

    @property
    def send_s(self) -> float:
        """Wall time of the sending phase (the throughput window, without start-up and output)."""
        return (self.send_end - self.send_start) if self.send_start and self.send_end else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "endpoints": self.endpoints,
            "workers": self.workers,
            "send_s": round(self.send_s, 3),
            "requests_per_s": round(self.requests / self.send_s, 1) if self.send_s else 0.0,
            "client_cpu_ms_per_request": round(1000 * self.cpu_s / self.requests, 4)
            if self.requests
            else None,
            # How unevenly the processes started and finished sending (0 with one process): the
            # throughput window above runs from the first start to the last end.
            "send_start_spread_s": round(max(s for s, _ in self.windows) - self.send_start, 3)
            if self.windows and self.send_start
            else 0.0,
            "send_end_spread_s": round(self.send_end - min(e for _, e in self.windows), 3)
            if self.windows and self.send_end
            else 0.0,
        }

    def add_timing(self, cpu_s: float, start: float, end: float) -> None:
        self.cpu_s += cpu_s
        self.windows.append((start, end))
        self.send_start = start if self.send_start is None else min(self.send_start, start)
        self.send_end = end if self.send_end is None else max(self.send_end, end)

    def add(self, requests: int, retries: int, endpoints: dict[str, dict[str, Any]]) -> None:
        self.requests += requests
        self.retries += retries
        for url, st in endpoints.items():
            agg = self.endpoints.setdefault(url, {})
            for k, v in st.items():
                if isinstance(v, bool):
                    agg[k] = bool(agg.get(k)) or v
                elif isinstance(v, (int, float)):
                    agg[k] = agg.get(k, 0) + v
                else:
                    agg[k] = v

    def add_pool(self, pool: Any) -> None:
        self.add(sum(e.stats.requests for e in pool.endpoints), pool.retries, pool.stats())


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------


def _wait_for_lock(path: Path) -> Any:
    """Open ``path`` and take its exclusive lock (a live worker holds it); returns the open file."""
    import fcntl

    f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() > deadline:
                f.close()
                raise RuntimeError(
                    f"{path} is still locked by a worker of another run after {LOCK_WAIT_S:.0f} s; "
                    "stop that run (or wait for it) and re-run"
                ) from None
            time.sleep(0.05)


def fold(
    paths: OutputPaths,
    fingerprint: dict[str, Any],
    mine: set[int],
    done: dict[int, dict[str, Any]],
    writer: JournalWriter,
) -> int:
    """Move the records of every worker journal into the run's journal; returns how many were new."""
    journals = worker_journals(paths)
    added = 0
    for path in journals:
        lock = _wait_for_lock(path)
        try:
            header, entries = load_journal(path, repair=False)
            if header is not None:
                try:
                    check_fingerprint(path, header.get("fingerprint", {}), fingerprint)
                except JournalMismatch as e:
                    raise RegenerationError(str(e)) from None
            for k, rec in sorted(entries.items()):
                if k in mine and k not in done:
                    done[k] = rec
                    writer.append(rec)
                    added += 1
        finally:
            lock.close()
    if journals:
        writer.sync()  # on disk in the run's journal before the worker journals go
        for path in journals:
            path.unlink(missing_ok=True)
        log.info("folded %d records from %d worker journals into %s", added, len(journals), writer.path)
    return added


def _worker_spec(job: RegenerationJob, w: int, n: int, fingerprint: dict[str, Any]) -> str:
    return json.dumps(
        {
            "job": job.to_json(),
            "worker": w,
            "workers": n,
            "concurrency": concurrency_share(job.settings.concurrency, w, n),
            "fingerprint": fingerprint,
            "parent": os.getpid(),
        }
    )


def chunk_size(left: int, workers: int, cap: int) -> int:
    """Guided self-scheduling: a quarter of an even share of what is left, at most ``cap``, at least 1."""
    return max(1, min(cap, math.ceil(left / (4 * workers))))


async def run_workers(
    job: RegenerationJob,
    paths: OutputPaths,
    fingerprint: dict[str, Any],
    todo: list[int],
    n: int,
    progress: Any,
    stats: RunStats,
) -> None:
    """Start ``n`` worker processes, hand them ``todo`` in chunks, relay their progress, wait for all.

    A worker that fails (or is killed) does not stop the others; afterwards the run fails with a
    message saying to re-run, which resumes from the journals.
    """
    for w in range(n):  # left by a run that died before folding: fold() already took them
        worker_journal(paths, w, n).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deepspec.regenerate.workers",
            _worker_spec(job, w, n, fingerprint),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for w in range(n)
    ]
    reported = [(0, 0)] * n
    base_records, base_tokens = progress.records, progress.tokens  # skipped records, counted already
    stats.workers = n
    left = collections.deque(todo)
    caps = [concurrency_share(job.settings.concurrency, w, n) for w in range(n)]
    started: set[int] = set()  # workers that asked for work once, or ended
    all_started = asyncio.Event()

    def start(w: int) -> None:
        started.add(w)
        if len(started) == n:
            all_started.set()

    async def hand_out(w: int, proc: asyncio.subprocess.Process) -> None:
        start(w)
        await all_started.wait()
        chunk = [left.popleft() for _ in range(min(len(left), chunk_size(len(left), n, caps[w])))]
        assert proc.stdin is not None
        try:
            proc.stdin.write(("W " + " ".join(map(str, chunk)) + "\n").encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):  # the worker died: its exit code reports it
            pass

    async def relay(w: int, proc: asyncio.subprocess.Process) -> int:
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                kind, _, rest = line.decode().rstrip("\n").partition(" ")
                if kind == "N":
                    await hand_out(w, proc)
                elif kind == "P":
                    records, tokens = rest.split()
                    reported[w] = (int(records), int(tokens))
                    progress.set(
                        base_records + sum(r for r, _ in reported), base_tokens + sum(t for _, t in reported)
                    )
                elif kind == "S":
                    s = json.loads(rest)
                    stats.add(s["requests"], s["retries"], s["endpoints"])
                    if s["send_start"] is not None:
                        stats.add_timing(s["cpu_s"], s["send_start"], s["send_end"])
        finally:
            start(w)  # a worker that ended before asking must not hold the others back
        return await proc.wait()

    try:
        codes = await asyncio.gather(*(relay(w, p) for w, p in enumerate(procs)))
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            if p.returncode is None:
                await p.wait()
    failed = [(w, c) for w, c in enumerate(codes) if c != 0]
    if failed:
        what = ", ".join(
            f"worker {w} {'killed by signal ' + str(-c) if c < 0 else 'exit ' + str(c)}" for w, c in failed
        )
        raise RegenerationError(
            f"{what} (see messages above); the finished records are journaled: re-run the same command "
            "to resume"
        )


# --------------------------------------------------------------------------------------------------
# Worker side: python -m deepspec.regenerate.workers SPEC_JSON
# --------------------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); elsewhere the watchdog below does it."""
    if sys.platform.startswith("linux"):
        import contextlib
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(3)


async def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    os._exit(3)


class _Reporter:
    """Progress lines for the parent, at most every 0.25 s."""

    def __init__(self) -> None:
        self.records = 0
        self.tokens = 0
        self._next = 0.0

    def update(self, record: dict[str, Any]) -> None:
        self.records += 1
        self.tokens += (record.get("usage") or {}).get("completion_tokens", 0)
        if (now := time.monotonic()) >= self._next:
            self.flush()
            self._next = now + 0.25

    def flush(self) -> None:
        sys.stdout.write(f"P {self.records} {self.tokens}\n")
        sys.stdout.flush()


class WorkFromParent:
    """A worker's records, asked from the parent in chunks: ``N`` on stdout, ``W i j k`` on stdin.

    The next chunk is asked for when the queue falls to half the last chunk, so lanes rarely wait.
    An empty ``W`` (or the parent's stdin closing) means there is no more work.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.queue: collections.deque[int] = collections.deque()
        self.low_water = 0
        self.exhausted = False
        self.asking: asyncio.Future[None] | None = None
        self.first_chunk: tuple[float, float] | None = None  # (time.time(), process_time) it came

    @classmethod
    async def open(cls) -> WorkFromParent:
        reader = asyncio.StreamReader(limit=1 << 24)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader)

    def _ask(self) -> None:
        if self.asking is None and not self.exhausted:
            sys.stdout.write("N\n")
            sys.stdout.flush()
            self.asking = asyncio.ensure_future(self._receive())

    async def _receive(self) -> None:
        words = (await self.reader.readline()).split()
        if len(words) <= 1:  # "W" alone, or EOF
            self.exhausted = True
        else:
            if self.first_chunk is None:
                self.first_chunk = (time.time(), time.process_time())
            self.queue.extend(int(x) for x in words[1:])
            self.low_water = (len(words) - 1) // 2
        self.asking = None

    async def take(self) -> int | None:
        """The next input index to send, or None when the parent has no more."""
        while True:
            if self.queue:
                k = self.queue.popleft()
                if len(self.queue) <= self.low_water:
                    self._ask()  # prefetch
                return k
            if self.exhausted:
                return None
            self._ask()
            assert self.asking is not None
            await asyncio.shield(self.asking)  # several lanes wait for the same answer


async def _work(spec: dict[str, Any]) -> None:
    job = RegenerationJob.from_json(spec["job"])
    w, n = spec["worker"], spec["workers"]
    watchdog = asyncio.ensure_future(_watch_parent(spec["parent"]))
    items, _ = load_items(job)
    writer = JournalWriter(
        worker_journal(job.paths, w, n),
        spec["fingerprint"],
        lock=True,
        extra={"worker": f"{w}/{n}", "pid": os.getpid()},
    )
    reporter = _Reporter()
    pool = None
    timing = None
    try:
        pool, model = await open_pool(job, spec["concurrency"])
        work = await WorkFromParent.open()

        def finished(rec: dict[str, Any]) -> None:
            writer.append(rec)
            reporter.update(rec)

        await send_records(work, items, pool, job, model, finished)
        if work.first_chunk is not None:  # the sending phase starts with the first chunk of work
            t0, cpu0 = work.first_chunk
            timing = (time.process_time() - cpu0, t0, time.time())
    finally:
        writer.close()  # fsync'd before the parent hears that this worker is done
        reporter.flush()
        if pool is not None:
            await pool.close()
        watchdog.cancel()
    stats = RunStats()
    if pool is not None:
        stats.add_pool(pool)
    if timing is not None:
        stats.add_timing(*timing)
    sys.stdout.write("S " + json.dumps(asdict(stats)) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    _die_with_parent(spec["parent"])
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s worker {spec['worker']}: %(message)s")
    install_uvloop()
    try:
        asyncio.run(_work(spec))
    except RegenerationError as e:
        print(f"error: worker {spec['worker']}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

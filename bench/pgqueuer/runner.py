"""Reference figure for bench/queue.sh: pgqueuer on the same PostgreSQL server.

    python runner.py <database-url> <jobs> <processes> [batch-size]

Installs pgqueuer's schema, enqueues <jobs> no-op jobs in batches of 100 (one statement each),
then starts <processes> worker processes, each a QueueManager in drain mode (dequeue batch size
10 by default), and times from the moment all are connected until every process exited (drain
mode exits once the queue is empty).
Prints one JSON line with the figures.
"""
import asyncio
import json
import multiprocessing
import sys
import time

import asyncpg
from pgqueuer import AsyncpgDriver, Job, QueueManager, Queries
from pgqueuer.domain.types import QueueExecutionMode


async def work(url: str, batch: int, ready, go) -> None:
    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    # Python's start-up and imports are not the queue's cost: the clock starts once every
    # process is connected and ready.
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    await qm.run(batch_size=batch, mode=QueueExecutionMode.drain)
    await conn.close()


def worker(url: str, batch: int, ready, go) -> None:
    asyncio.run(work(url, batch, ready, go))


async def setup(url: str, jobs: int) -> float:
    conn = await asyncpg.connect(url)
    q = Queries(AsyncpgDriver(conn))
    await q.install()
    t0 = time.perf_counter()
    for i in range(0, jobs, 100):
        n = min(100, jobs - i)
        await q.enqueue(["noop"] * n, [None] * n, [0] * n)
    secs = time.perf_counter() - t0
    await conn.close()
    return secs


def main() -> None:
    url, jobs, procs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    enqueue_secs = asyncio.run(setup(url, jobs))
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    ps = [ctx.Process(target=worker, args=(url, batch, ready, go)) for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.acquire()
    t0 = time.perf_counter()
    go.set()
    for p in ps:
        p.join()
    drain = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in ps):
        sys.exit("a pgqueuer worker failed")
    print(json.dumps({
        "jobs": jobs, "procs": procs, "batch": batch,
        "enqueue_batch100_jobs_per_s": round(jobs / enqueue_secs),
        "drain_secs": round(drain, 2),
        "drain_jobs_per_s": round(jobs / drain),
    }))


if __name__ == "__main__":
    main()

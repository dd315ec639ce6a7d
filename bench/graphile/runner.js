// Reference figure for bench/queue.sh: graphile-worker on the same PostgreSQL server.
//
//   node runner.js <database-url> <jobs> <processes>
//
// Adds <jobs> no-op jobs with addJobs in batches of 100 (timed: the enqueue rate), then starts
// <processes> worker processes (child_process.fork), each `run()` with concurrency 16 and a
// 100 ms poll interval, and times until graphile_worker's job table is empty (graphile deletes a
// job when it completes). Prints one JSON line with the figures.
"use strict";
const { fork } = require("node:child_process");
const { run, runMigrations, makeWorkerUtils, Logger } = require("graphile-worker");

const quiet = new Logger(() => () => {});
const CONCURRENCY = 16;
const POLL_MS = 100;

async function worker(connectionString) {
  const runner = await run({
    connectionString,
    concurrency: CONCURRENCY,
    pollInterval: POLL_MS,
    maxPoolSize: CONCURRENCY + 2,
    noHandleSignals: true,
    logger: quiet,
    taskList: { noop: async () => {} },
  });
  process.send("ready");
  process.on("message", async (m) => {
    if (m === "stop") {
      await runner.stop();
      process.exit(0);
    }
  });
}

async function main() {
  const [url, jobsArg, procsArg] = process.argv.slice(2);
  const jobs = Number(jobsArg);
  const procs = Number(procsArg);
  await runMigrations({ connectionString: url, logger: quiet });
  const utils = await makeWorkerUtils({ connectionString: url, logger: quiet });
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < jobs; i += 100) {
    const batch = [];
    for (let j = i; j < Math.min(i + 100, jobs); j++) {
      batch.push({ identifier: "noop", payload: { n: j } });
    }
    await utils.addJobs(batch);
  }
  const enqueueSecs = Number(process.hrtime.bigint() - t0) / 1e9;

  // Children start (and connect) before the clock starts, as the Rust workers do.
  const children = [];
  for (let p = 0; p < procs; p++) {
    const child = fork(__filename, ["--worker", url], { stdio: "inherit" });
    children.push(child);
  }
  // Jobs are already queued, so a child may start draining before the others are ready: start
  // the clock when the first child is ready.
  await Promise.race(children.map((c) => new Promise((r) => c.once("message", r))));
  const t1 = process.hrtime.bigint();
  for (;;) {
    const { rows } = await utils.withPgClient((c) =>
      c.query("select count(*)::int as n from graphile_worker._private_jobs"),
    );
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const drainSecs = Number(process.hrtime.bigint() - t1) / 1e9;
  await Promise.all(
    children.map((c) => new Promise((r) => { c.once("exit", r); c.send("stop"); })),
  );
  await utils.release();
  console.log(JSON.stringify({
    jobs, procs, concurrency: CONCURRENCY,
    enqueue_batch100_jobs_per_s: Math.round(jobs / enqueueSecs),
    drain_secs: Number(drainSecs.toFixed(2)),
    drain_jobs_per_s: Math.round(jobs / drainSecs),
  }));
}

if (process.argv[2] === "--worker") {
  worker(process.argv[3]).catch((e) => { console.error(e); process.exit(1); });
} else {
  main().catch((e) => { console.error(e); process.exit(1); });
}

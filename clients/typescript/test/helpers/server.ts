// Starts the real fleetcare server binary on a fresh embedded store (its
// default: an SQLite file in a data directory of its own, so nothing else needs
// to be installed), and cleans both up (SIGTERM, wait, remove the directory),
// even when a test fails. A "database" here is the name of such a directory.

import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** clients/typescript (found by walking up from this compiled file to package.json). */
export const packageRoot = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("package.json not found above " + import.meta.url);
    dir = up;
  }
  return dir;
})();

/** The fleetcare repository root. */
export const repoRoot = resolve(packageRoot, "..", "..");

export function fleetcareBin(): string {
  const bin = process.env.FLEETCARE_BIN || join(repoRoot, "target", "debug", "fleetcare");
  if (!existsSync(bin)) {
    throw new Error(`fleetcare binary not found at ${bin}: build it (cargo build) or set FLEETCARE_BIN`);
  }
  return bin;
}

/** Where the test servers' data directories live. */
const dataRoot = mkdtempSync(join(tmpdir(), "fleetcare-ts-data-"));

function dataDir(name: string): string {
  return join(dataRoot, name);
}

export function uniqueDbName(): string {
  return `fleetcare_ts_${process.pid}_${randomBytes(4).toString("hex")}`;
}

/** Removes a test store (synchronously, so it also works from an exit handler). */
export function dropDatabase(name: string): void {
  rmSync(dataDir(name), { recursive: true, force: true });
}

export interface StartOptions {
  /** Reuse a database (e.g. to restart a server); by default a fresh one is made and dropped on stop(). */
  dbName?: string;
  /** Reuse a session directory; by default a temporary one is made and removed on stop(). */
  sessionDir?: string;
  /** Listen address; default 127.0.0.1:0. */
  listen?: string;
  /** Extra `fleetcare serve` flags. */
  args?: string[];
}

export interface FleetcareServer {
  /** "127.0.0.1:PORT" as logged by the server. */
  address: string;
  port: number;
  dbName: string;
  sessionDir: string;
  /** Everything the server logged so far, one JSON (or text) line each. */
  logs: string[];
  /** SIGTERM, wait for exit. Keeps the database and session dir. */
  terminate(): Promise<void>;
  /** terminate(), then drop the database and remove the session dir this call created. */
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
const ownedDbs = new Set<string>();
const ownedDirs = new Set<string>();

// Last line of defence if a test file dies without running its after() hooks.
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
  for (const db of ownedDbs) dropDatabase(db);
  for (const dir of ownedDirs) rmSync(dir, { recursive: true, force: true });
  rmSync(dataRoot, { recursive: true, force: true });
});
// Interrupted (Ctrl-C, or the test runner cancelling this file): still clean up.
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => process.exit(128 + (signal === "SIGINT" ? 2 : 15)));
}

export async function startServer(options: StartOptions = {}): Promise<FleetcareServer> {
  const bin = fleetcareBin();
  const ownDb = options.dbName === undefined;
  const dbName = options.dbName ?? uniqueDbName();
  const ownDir = options.sessionDir === undefined;
  const sessionDir = options.sessionDir ?? mkdtempSync(join(tmpdir(), "fleetcare-ts-sessions-"));
  if (ownDb) ownedDbs.add(dbName);
  if (ownDir) ownedDirs.add(sessionDir);
  /** Drops what this call created (a database or session dir passed in belongs to the caller). */
  const removeOwned = () => {
    if (ownDb) {
      dropDatabase(dbName);
      ownedDbs.delete(dbName);
    }
    if (ownDir) {
      rmSync(sessionDir, { recursive: true, force: true });
      ownedDirs.delete(sessionDir);
    }
  };

  const child = spawn(
    bin,
    [
      "serve",
      "--listen",
      options.listen ?? "127.0.0.1:0",
      "--data-dir",
      dataDir(dbName),
      "--log-format",
      "json",
      "--session-dir",
      sessionDir,
      // No metrics listener: its default port would be shared by every test server.
      "--http-listen",
      "",
      ...(options.args ?? []),
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  running.add(child);
  const exited = new Promise<void>((res) => child.once("exit", () => res()));
  exited.then(() => running.delete(child));

  const logs: string[] = [];
  const address = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`server did not log both "serving" and "store open, serving" within 120 s:\n${logs.join("\n")}`)), 120_000);
    // The server may listen ("serving", with its address) before its store
    // is open, answering UNAVAILABLE until then, or open the store first
    // ("store open, serving"): a test starts once both are logged.
    let listening: string | undefined;
    let storeOpen = false;
    // Reading every line also keeps draining the pipe for the server's whole life.
    createInterface({ input: child.stderr! }).on("line", (line) => {
      logs.push(line);
      try {
        const rec = JSON.parse(line) as { message?: string; addr?: string };
        if (rec.message === "serving" && rec.addr) listening = rec.addr;
        if (rec.message === "store open, serving") storeOpen = true;
        if (storeOpen && listening !== undefined) {
          clearTimeout(timer);
          res(listening);
        }
      } catch {
        // not JSON: keep it in the logs
      }
    });
    child.once("error", (err) => {
      clearTimeout(timer);
      rej(err);
    });
    exited.then(() => {
      clearTimeout(timer);
      rej(new Error(`server exited with ${child.exitCode ?? child.signalCode} before serving:\n${logs.join("\n")}`));
    });
  }).catch(async (err) => {
    child.kill("SIGKILL");
    await exited;
    removeOwned();
    throw err;
  });

  const terminate = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const killer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    await exited;
    clearTimeout(killer);
  };

  return {
    address,
    port: Number(address.slice(address.lastIndexOf(":") + 1)),
    dbName,
    sessionDir,
    logs,
    terminate,
    stop: async () => {
      await terminate();
      removeOwned();
    },
  };
}

/** Polls `check` until it returns a truthy value, or fails after `timeoutMs`. */
export async function eventually<T>(
  what: string,
  check: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A unique agent id prefix for one test. */
export function uniqueId(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

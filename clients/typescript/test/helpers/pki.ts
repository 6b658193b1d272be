// Test certificates made with the openssl CLI: a CA, a server certificate it
// signed (for localhost and 127.0.0.1) and a client certificate it signed.

import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface Pki {
  dir: string;
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** `fleetcare serve` flags for TLS with these files (and mutual TLS with this CA). */
  serverArgs(mutual?: boolean): string[];
  remove(): void;
}

function openssl(args: string[]): void {
  const run = spawnSync("openssl", args, { encoding: "utf8" });
  if (run.error || run.status !== 0) {
    throw new Error(`openssl ${args[0]} failed: ${run.error ?? run.stderr}`);
  }
}

/** Whether the openssl CLI can be run (the TLS tests skip without it). */
export function haveOpenssl(): boolean {
  const run = spawnSync("openssl", ["version"]);
  return !run.error && run.status === 0;
}

export function makePki(name = "fleetcare test CA"): Pki {
  const dir = mkdtempSync(join(tmpdir(), "fleetcare-ts-pki-"));
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  const ca = join(dir, "ca.pem");
  const caKey = join(dir, "ca-key.pem");
  openssl([
    "req", "-x509", ...ec, "-days", "1", "-subj", `/CN=${name}`, "-keyout", caKey, "-out", ca,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  const leaf = (stem: string, subject: string, extensions: string, serial: number) => {
    const cert = join(dir, `${stem}.pem`);
    const key = join(dir, `${stem}-key.pem`);
    const csr = join(dir, `${stem}.csr`);
    const ext = join(dir, `${stem}.ext`);
    writeFileSync(ext, `${extensions}\nbasicConstraints=critical,CA:FALSE\n`);
    openssl(["req", "-new", ...ec, "-subj", `/CN=${subject}`, "-keyout", key, "-out", csr]);
    openssl([
      "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", caKey, "-set_serial", String(serial), "-days", "1",
      "-out", cert, "-extfile", ext,
    ]);
    return { cert, key };
  };
  const server = leaf("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth", 2);
  const client = leaf("client", "ts-client", "extendedKeyUsage=clientAuth", 3);
  return {
    dir,
    ca,
    serverCert: server.cert,
    serverKey: server.key,
    clientCert: client.cert,
    clientKey: client.key,
    serverArgs: (mutual = false) => [
      "--tls-cert", server.cert, "--tls-key", server.key, ...(mutual ? ["--tls-client-ca", ca] : []),
    ],
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

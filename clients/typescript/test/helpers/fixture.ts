// One live server (and a client for it) per test file.

import { after, before } from "node:test";

import { createFleetcareClient, type FleetcareClient } from "../../src/index.js";
import { startServer, type FleetcareServer, type StartOptions } from "./server.js";

export interface Live {
  server: FleetcareServer;
  client: FleetcareClient;
}

/** Starts a server before the file's tests and stops it (and drops its database) after them. */
export function useServer(options: StartOptions = {}): Live {
  const live = {} as Live;
  before(async () => {
    live.server = await startServer(options);
    live.client = createFleetcareClient({ address: live.server.address });
  });
  after(async () => {
    live.client?.close();
    await live.server?.stop();
  });
  return live;
}

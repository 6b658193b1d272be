// A TCP proxy that can drop every connection and refuse new ones, to cut a
// client off from the server without touching the server.

import { createServer, connect, type Server, type Socket } from "node:net";

export class TcpProxy {
  /** "127.0.0.1:PORT" to point clients at. */
  address = "";
  /** Connections accepted and forwarded. */
  accepted = 0;
  /** Connections refused while down. */
  refused = 0;
  private down = false;
  private readonly sockets = new Set<Socket>();
  private readonly server: Server;

  private constructor(private readonly target: { host: string; port: number }) {
    this.server = createServer((client) => this.onConnection(client));
  }

  static async start(targetAddress: string): Promise<TcpProxy> {
    const i = targetAddress.lastIndexOf(":");
    const proxy = new TcpProxy({ host: targetAddress.slice(0, i), port: Number(targetAddress.slice(i + 1)) });
    await new Promise<void>((res, rej) => {
      proxy.server.once("error", rej);
      proxy.server.listen(0, "127.0.0.1", () => res());
    });
    const addr = proxy.server.address();
    if (addr === null || typeof addr === "string") throw new Error("proxy has no TCP address");
    proxy.address = `127.0.0.1:${addr.port}`;
    return proxy;
  }

  private onConnection(client: Socket): void {
    if (this.down) {
      this.refused++;
      client.resetAndDestroy();
      return;
    }
    this.accepted++;
    const upstream = connect(this.target.port, this.target.host);
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
      s.on("error", () => {
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  }

  /** Drops every open connection (TCP reset) and refuses new ones until up(). */
  cut(): void {
    this.down = true;
    for (const s of this.sockets) s.resetAndDestroy();
  }

  /** Accepts connections again. */
  up(): void {
    this.down = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((res) => this.server.close(() => res()));
  }
}

// Graceful shutdown (SIGTERM/SIGINT): stop accepting, let running requests finish for up to the
// grace period (--shutdown-timeout), then cancel what is left and close the engine.
//   1. app.close(): the listening socket closes (new connections are refused), idle keep-alive
//      connections are closed, /health answers 503, a request arriving on a busy keep-alive
//      connection gets 503 with OpenAI's error object (operations.ts); running ones go on.
//   2. Running requests finish, or the grace period ends: the engine is closed, which cancels
//      every live generation (their clients get 503 "aborted by the server", streams an error
//      event and [DONE]) and frees its KV cells; connections still open after that are cut.
// `now()` (a second signal) skips the wait.
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../../engine/engine.js';

export interface ShutdownOptions {
  /** How long running requests may take to finish, ms. */
  graceMs: number;
  /** After cancelling, how long to wait for the cancelled responses to go out before cutting connections, ms (default 5000). */
  drainMs?: number;
  log?: { info(msg: string): void; warn(msg: string): void };
}

export interface ShutdownResult {
  /** Requests still running when the grace period ended (cancelled). */
  cancelled: number;
  /** True when app.close() failed. */
  closeFailed: boolean;
}

export class GracefulShutdown {
  private skipWait: (() => void) | null = null;
  private started: Promise<ShutdownResult> | null = null;

  constructor(
    private readonly app: FastifyInstance,
    private readonly engine: Engine,
    private readonly opts: ShutdownOptions,
  ) {}

  /** Starts the shutdown (once); resolves when the server and the engine are closed. */
  run(): Promise<ShutdownResult> {
    this.started ??= this.shutdown();
    return this.started;
  }

  /** Stops waiting for running requests: cancel them now. */
  now(): void {
    this.skipWait?.();
  }

  private async shutdown(): Promise<ShutdownResult> {
    const { app, engine, opts } = this;
    let closeFailed = false;
    // app.close() closes the connections idle at that moment; a keep-alive connection whose
    // response ends later would hold it open until its keep-alive timeout: close those as they go idle.
    const reaper = setInterval(() => app.server.closeIdleConnections(), 100);
    const closed = app.close().then(
      () => true,
      () => {
        closeFailed = true;
        return true;
      },
    );
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise<false>((resolve) => {
      this.skipWait = () => resolve(false);
      timer = setTimeout(() => resolve(false), opts.graceMs);
    });
    const finished = await Promise.race([closed, waited]);
    clearTimeout(timer);
    let cancelled = 0;
    if (!finished) {
      cancelled = engine.liveCount;
      opts.log?.warn(
        cancelled > 0
          ? `shutdown: cancelling ${cancelled} request${cancelled === 1 ? '' : 's'} still running`
          : 'shutdown: closing the connections still open',
      );
    }
    // Cancels whatever still runs (nothing, when every request finished) and frees its KV cells.
    await engine.close();
    if (!finished) {
      // The cancelled requests answer at once; cut connections that still hang on after that.
      let drainTimer: NodeJS.Timeout | undefined;
      const drained = await Promise.race([
        closed,
        new Promise<false>((resolve) => (drainTimer = setTimeout(() => resolve(false), opts.drainMs ?? 5000))),
      ]);
      clearTimeout(drainTimer);
      if (!drained) app.server.closeAllConnections();
      await closed;
    }
    clearInterval(reaper);
    return { cancelled, closeFailed };
  }
}

// Bounded concurrency over an async stream: at most `concurrency` calls of `work` in flight,
// items pulled only as slots free up (so a two-million-line input is never held in memory).
// The first failure, or `stop` aborting, ends the pulling; calls in flight are waited for, then
// the failure (if any) is thrown.

export async function runPool<T>(
  source: AsyncIterable<T> | Iterable<T>,
  concurrency: number,
  work: (item: T) => Promise<void>,
  stop?: AbortSignal,
): Promise<void> {
  const limit = Math.max(1, Math.floor(concurrency));
  const inFlight = new Set<Promise<void>>();
  let failure: { err: unknown } | null = null;
  const it = (Symbol.asyncIterator in source
    ? (source as AsyncIterable<T>)[Symbol.asyncIterator]()
    : (source as Iterable<T>)[Symbol.iterator]()) as AsyncIterator<T> | Iterator<T>;
  try {
    for (;;) {
      if (failure || stop?.aborted) break;
      if (inFlight.size >= limit) {
        await Promise.race(inFlight);
        continue;
      }
      const next = await it.next();
      if (next.done) break;
      if (failure || stop?.aborted) break;
      const p: Promise<void> = work(next.value).then(
        () => { inFlight.delete(p); },
        (err: unknown) => {
          inFlight.delete(p);
          failure ??= { err };
        },
      );
      inFlight.add(p);
    }
  } finally {
    await Promise.all(inFlight);
    await it.return?.();
  }
  const f = failure as { err: unknown } | null;
  if (f) throw f.err;
}

/**
 * Runs `fn` with a signal of its own that aborts when `parent` does. Long runs hand one of these
 * to each request instead of the run's signal: listeners a request leaves on its signal (the
 * engine's, a fetch's) go away with it, instead of piling up on the run's signal.
 */
export async function withLinkedSignal<T>(parent: AbortSignal | undefined, fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ac = new AbortController();
  if (!parent) return fn(ac.signal);
  if (parent.aborted) ac.abort(parent.reason);
  const onAbort = (): void => ac.abort(parent.reason);
  parent.addEventListener('abort', onAbort, { once: true });
  try {
    return await fn(ac.signal);
  } finally {
    parent.removeEventListener('abort', onAbort);
  }
}

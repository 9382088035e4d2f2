// Progress of long byte-counted work (downloads, conversion) on stderr: a bar redrawn in place on
// a terminal, plain lines every 10% (and at the end) otherwise, so logs stay readable.

export interface ProgressStream {
  write(s: string): unknown;
  isTTY?: boolean;
  columns?: number;
}

export function formatBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

export interface Progress {
  /** Bytes done so far (absolute). */
  update(done: number): void;
  /** Final line; `note` replaces the rate (e.g. "cached"). */
  finish(note?: string): void;
}

/** A progress reporter for `label` over `total` bytes (0 or unknown: counts only). */
export function createProgress(stream: ProgressStream, label: string, total: number, start = 0): Progress {
  const tty = stream.isTTY === true;
  const t0 = Date.now();
  let lastDraw = 0;
  let lastStep = -1;
  let done = start;
  const rate = () => {
    const s = (Date.now() - t0) / 1000;
    return s > 0.2 ? `${formatBytes((done - start) / s)}/s` : '';
  };
  const line = (): string => {
    if (!total) return `${label}: ${formatBytes(done)} ${rate()}`.trimEnd();
    const pct = Math.min(100, Math.floor((100 * done) / total));
    if (!tty) return `${label}: ${pct}% (${formatBytes(done)} of ${formatBytes(total)}) ${rate()}`.trimEnd();
    const width = 24;
    const fill = Math.round((width * Math.min(done, total)) / total);
    const text = `${label} [${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${String(pct).padStart(3)}% ${formatBytes(done)}/${formatBytes(total)} ${rate()}`;
    const cols = stream.columns ?? 120;
    return text.length >= cols ? text.slice(0, cols - 1) : text.padEnd(cols - 1);
  };
  return {
    update(n: number) {
      done = n;
      if (tty) {
        const now = Date.now();
        if (now - lastDraw < 100) return;
        lastDraw = now;
        stream.write(`\r${line()}`);
        return;
      }
      const step = total ? Math.floor((10 * done) / total) : -1;
      if (step > lastStep && step < 10) {
        lastStep = step;
        stream.write(`${line()}\n`);
      }
    },
    finish(note?: string) {
      const end = note ? `${label}: ${note}` : line().replace(/ +$/, '');
      stream.write(tty ? `\r${note ? end.padEnd((stream.columns ?? 120) - 1) : line()}\n` : `${end}\n`);
    },
  };
}

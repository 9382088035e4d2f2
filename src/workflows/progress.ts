// Progress of a bulk run on stderr: on a terminal, one line redrawn in place
//   caption [########------------]  412/1000  41.2%  5.3 img/s  ETA 1m51s  2 errors
// elsewhere (logs), a plain line every `intervalMs` and one at the end.

import type { ProgressStream } from '../hub/progress.js';

/** stderr, or anything with write (and isTTY / columns when it is a terminal). */
export type ProgressSink = ProgressStream;

export interface RunProgressOptions {
  label: string;
  /** Units of work expected this run (0: unknown). */
  total: number;
  /** Unit name for the rate, e.g. "img". */
  unit?: string;
  /** Plain-line period when not on a terminal (default 10 s). */
  intervalMs?: number;
  /** Redraw period on a terminal (default 200 ms). */
  redrawMs?: number;
  now?: () => number;
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  const h = Math.floor(s / 3600);
  return `${h}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export function formatRate(perSecond: number, unit: string): string {
  if (!Number.isFinite(perSecond)) return `? ${unit}/s`;
  return `${perSecond >= 100 ? perSecond.toFixed(0) : perSecond >= 10 ? perSecond.toFixed(1) : perSecond.toFixed(2)} ${unit}/s`;
}

export class RunProgress {
  private done = 0;
  private errors = 0;
  private readonly t0: number;
  private lastDraw = -Infinity;
  private finished = false;
  private readonly now: () => number;

  constructor(private readonly out: ProgressSink | null, private readonly opts: RunProgressOptions) {
    this.now = opts.now ?? (() => performance.now());
    this.t0 = this.now();
  }

  get completed(): number {
    return this.done;
  }

  /** Units per second since the start. */
  rate(): number {
    const s = (this.now() - this.t0) / 1000;
    return s > 0 ? this.done / s : 0;
  }

  /** The status line (without terminal control characters). */
  line(width = 80): string {
    const { total, label } = this.opts;
    const unit = this.opts.unit ?? 'it';
    const r = this.rate();
    const parts: string[] = [];
    if (total > 0) {
      const frac = Math.min(1, this.done / total);
      const eta = r > 0 ? formatDuration((total - this.done) / r) : '?';
      const counts = `${this.done}/${total}`;
      const pct = `${(100 * frac).toFixed(1)}%`;
      const tail = `${formatRate(r, unit)}  ETA ${eta}${this.errors ? `  ${this.errors} error${this.errors > 1 ? 's' : ''}` : ''}`;
      if (this.out?.isTTY) {
        const barWidth = Math.max(10, Math.min(30, width - label.length - counts.length - pct.length - tail.length - 12));
        const fill = Math.round(barWidth * frac);
        parts.push(`${label} [${'#'.repeat(fill)}${'-'.repeat(barWidth - fill)}]`);
      } else {
        parts.push(`${label}:`);
      }
      parts.push(counts, pct, tail);
    } else {
      parts.push(`${label}: ${this.done} done`, formatRate(r, unit));
      if (this.errors) parts.push(`${this.errors} error${this.errors > 1 ? 's' : ''}`);
    }
    return parts.join('  ');
  }

  /** One unit finished (an error record counts as done, and as an error). */
  tick(isError = false): void {
    this.done++;
    if (isError) this.errors++;
    this.draw(false);
  }

  private draw(force: boolean): void {
    if (!this.out || this.finished) return;
    const t = this.now();
    const tty = this.out.isTTY === true;
    const period = tty ? (this.opts.redrawMs ?? 200) : (this.opts.intervalMs ?? 10_000);
    if (!force && t - this.lastDraw < period) return;
    if (!tty && !force && this.lastDraw === -Infinity) {
      // Logs: the first plain line after one period, not on the first record.
      this.lastDraw = this.t0;
      if (t - this.lastDraw < period) return;
    }
    this.lastDraw = t;
    if (tty) this.out.write(`\r${this.line(this.out.columns ?? 80)}\x1b[K`);
    else this.out.write(`${this.line()}\n`);
  }

  /** Final line. */
  finish(): void {
    if (this.finished) return;
    this.draw(true);
    if (this.out?.isTTY) this.out.write('\n');
    this.finished = true;
  }
}

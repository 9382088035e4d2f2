// A Prometheus histogram whose observations are kept by someone else (the engine thread) as
// counts per power of two, read whole at scrape time: no event per observation crosses into JS.
// Its bucket boundaries must be powers of two, so each `le` count is exact.
import type { Registry } from 'prom-client';

/** counts[k]: observations v with 2^(k-1) < v <= 2^k (k = 0: v <= 1); sum: of every observation. */
export interface Log2Counts {
  counts: number[];
  sum: number;
}

export interface Log2HistogramOptions {
  name: string;
  help: string;
  /** Upper bounds, ascending powers of two (+Inf is added). */
  buckets: number[];
  labels: Record<string, string>;
  read: () => Log2Counts;
}

/** Registers the histogram in `registry` (prom-client takes any object with name, help, type and get()). */
export function registerLog2Histogram(registry: Registry, opts: Log2HistogramOptions): void {
  const exponents = opts.buckets.map((b) => {
    const k = Math.log2(b);
    if (!Number.isInteger(k) || k < 0) throw new Error(`${opts.name}: bucket ${b} is not a power of two`);
    return k;
  });
  const { name, help, labels } = opts;
  const metric = {
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    reset() {},
    async get() {
      const { counts, sum } = opts.read();
      const upTo = (k: number) => counts.slice(0, k + 1).reduce((a, c) => a + c, 0);
      const total = upTo(counts.length - 1);
      const bucket = (le: number | string, value: number) => ({ labels: { ...labels, le }, value, metricName: `${name}_bucket` });
      return {
        name, help, type: 'histogram', aggregator: 'sum',
        values: [
          ...opts.buckets.map((b, i) => bucket(b, upTo(exponents[i]!))),
          bucket('+Inf', total),
          { labels, value: sum, metricName: `${name}_sum` },
          { labels, value: total, metricName: `${name}_count` },
        ],
      };
    },
  };
  registry.registerMetric(metric as unknown as Parameters<Registry['registerMetric']>[0]);
}

// Statistics for the benchmark: percentiles (numpy's default "linear" method, as vLLM's
// benchmark_serving reports them), and the per-level summary of a set of streamed requests.

/** The q-th percentile (0..100) of xs with linear interpolation between closest ranks (numpy default). NaN for no data. */
export function percentile(xs: readonly number[], q: number): number {
  if (!(q >= 0 && q <= 100)) throw new RangeError(`percentile must be in [0, 100], got ${q}`);
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = ((s.length - 1) * q) / 100;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo] + (s[hi] - s[lo]) * (pos - lo);
}

export function mean(xs: readonly number[]): number {
  return xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length;
}

/** What one streamed request measured; all times in milliseconds of performance.now(). */
export interface RequestResult {
  ok: boolean;
  error?: string;
  /** Request sent. */
  start: number;
  /** First chunk carrying generated text (or, if none did, the first chunk with a choice). */
  firstToken?: number;
  /** Last chunk carrying generated text. */
  lastToken?: number;
  /** Stream finished ([DONE] or end of body). */
  end: number;
  /** Completion tokens: usage.completion_tokens when the server reports it, else the content chunks. */
  completionTokens: number;
  promptTokens?: number;
  /** Gaps between consecutive content chunks (ms). */
  itl: number[];
  /** Content chunks received. */
  chunks: number;
}

export interface LevelSummary {
  concurrency: number;
  requests: number;
  completed: number;
  failed: number;
  /** First error messages, for the report. */
  errors: string[];
  /** From the first request sent to the last one finished (s). */
  durationS: number;
  captionsPerS: number;
  outputTokensPerS: number;
  /** Mean completion tokens of completed requests (checks the forced length). */
  meanOutputTokens: number;
  meanPromptTokens: number;
  ttftMs: { mean: number; p50: number; p99: number };
  /** Time per output token after the first: (last - first) / (tokens - 1), per request. */
  tpotMs: { mean: number; p50: number; p99: number };
  /** Inter-chunk latency over all chunks of all requests. */
  itlMs: { mean: number; p50: number; p99: number };
  /** End-to-end latency per request. */
  e2eMs: { mean: number; p50: number; p99: number };
  /** Set when the level hit the deadline and only part of it ran. */
  truncated?: boolean;
}

const dist = (xs: number[]) => ({ mean: mean(xs), p50: percentile(xs, 50), p99: percentile(xs, 99) });

export function summarize(concurrency: number, results: readonly RequestResult[], truncated = false): LevelSummary {
  const done = results.filter((r) => r.ok);
  const failed = results.filter((r) => !r.ok);
  const t0 = results.length ? Math.min(...results.map((r) => r.start)) : 0;
  const t1 = results.length ? Math.max(...results.map((r) => r.end)) : 0;
  const durationS = (t1 - t0) / 1000;
  const tokens = done.reduce((a, r) => a + r.completionTokens, 0);
  const ttft = done.filter((r) => r.firstToken !== undefined).map((r) => r.firstToken! - r.start);
  const tpot = done
    .filter((r) => r.firstToken !== undefined && r.lastToken !== undefined && r.completionTokens > 1)
    .map((r) => (r.lastToken! - r.firstToken!) / (r.completionTokens - 1));
  const prompt = done.filter((r) => r.promptTokens !== undefined).map((r) => r.promptTokens!);
  return {
    concurrency,
    requests: results.length,
    completed: done.length,
    failed: failed.length,
    errors: [...new Set(failed.map((r) => r.error ?? 'unknown error'))].slice(0, 5),
    durationS,
    captionsPerS: durationS > 0 ? done.length / durationS : NaN,
    outputTokensPerS: durationS > 0 ? tokens / durationS : NaN,
    meanOutputTokens: mean(done.map((r) => r.completionTokens)),
    meanPromptTokens: mean(prompt),
    ttftMs: dist(ttft),
    tpotMs: dist(tpot),
    itlMs: dist(done.flatMap((r) => r.itl)),
    e2eMs: dist(done.map((r) => r.end - r.start)),
    ...(truncated ? { truncated } : {}),
  };
}

/** Relative error ||a - b|| / ||b|| of a against reference b (Infinity when lengths differ). */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

// What a caprl server's /metrics says about one benchmark level: two scrapes (before and after
// the level) and their difference, as mean times per request and engine-step rates. It tells
// where TTFT goes (image prep, queue, vision encoder, prefill) and how full the steps were.

/** Sum of the samples named `name` whose labels include `labels` (0 when none), from Prometheus text. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([^{\s]+)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const ls = m[3] ?? '';
    if (Object.entries(labels).every(([k, v]) => ls.includes(`${k}="${v}"`))) sum += Number(m[4]);
  }
  return sum;
}

/** A server's /metrics text. */
export async function metricsText(baseUrl: string): Promise<string> {
  const res = await fetch(`${baseUrl}/metrics`, { signal: AbortSignal.timeout(10_000) });
  if (!res.ok) throw new Error(`GET ${baseUrl}/metrics: HTTP ${res.status}`);
  return res.text();
}

/** A caprl server's /metrics text, or undefined where there is none (llama-server without --metrics). */
export async function caprlMetrics(baseUrl: string): Promise<string | undefined> {
  try {
    const text = await metricsText(baseUrl);
    return text.includes('caprl:engine_steps_total') ? text : undefined;
  } catch {
    return undefined;
  }
}

export interface EngineBreakdown {
  /** Requests finished during the level (vllm:e2e_request_latency_seconds count). */
  requests: number;
  /** Means per request, ms. prefillMs: admitted -> first token, waiting on the vision encoder included. */
  preprocessMs: number;
  queueMs: number;
  imageEncodeMs: number;
  prefillMs: number;
  decodeMs: number;
  steps: number;
  /** The level's wall time over its engine steps. */
  stepMs: number;
  /** Sequences that decoded a token, per step. */
  seqsPerStep: number;
  /** Tokens (decode + prompt + image rows) per step. */
  tokensPerStep: number;
  /**
   * Engine-thread ms per step in the model (llama_decode until the logits are ready), in the draws,
   * waiting for the CPU while the vision encoder had its turn (model and encoder both on the CPU),
   * and the rest (host work).
   */
  modelMsPerStep: number;
  sampleMsPerStep: number;
  cpuWaitMsPerStep: number;
  hostMsPerStep: number;
  /** Per-sequence KV layout: sequences moved to a lower id (stream copied) to keep a decode step one ubatch. */
  streamMoves: number;
}

export function breakdown(before: string, after: string, durationS: number): EngineBreakdown {
  const d = (name: string) => metricValue(after, name) - metricValue(before, name);
  const meanMs = (hist: string) => {
    const n = d(`${hist}_count`);
    return n > 0 ? (d(`${hist}_sum`) / n) * 1000 : NaN;
  };
  const steps = d('caprl:engine_steps_total');
  const per = (x: number) => (steps > 0 ? x / steps : NaN);
  return {
    requests: d('vllm:e2e_request_latency_seconds_count'),
    preprocessMs: meanMs('caprl:request_preprocessing_seconds'),
    queueMs: meanMs('vllm:request_queue_time_seconds'),
    imageEncodeMs: meanMs('caprl:image_encode_seconds'),
    prefillMs: meanMs('vllm:request_prefill_time_seconds'),
    decodeMs: meanMs('vllm:request_decode_time_seconds'),
    steps,
    stepMs: per(durationS * 1000),
    seqsPerStep: per(d('caprl:engine_step_sequences_total')),
    tokensPerStep: per(d('vllm:iteration_tokens_total_sum')),
    modelMsPerStep: per(d('caprl:engine_model_seconds_total') * 1000),
    sampleMsPerStep: per(d('caprl:engine_sample_seconds_total') * 1000),
    cpuWaitMsPerStep: per(d('caprl:engine_cpu_wait_seconds_total') * 1000),
    hostMsPerStep: per(
      (d('caprl:engine_busy_seconds_total') - d('caprl:engine_model_seconds_total') - d('caprl:engine_sample_seconds_total') - d('caprl:engine_cpu_wait_seconds_total')) *
        1000,
    ),
    streamMoves: d('caprl:kv_stream_moves_total'),
  };
}

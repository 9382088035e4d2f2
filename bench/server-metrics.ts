// What a caprl server's /metrics says about one benchmark level: two scrapes (before and after
// the level) and their difference, as mean times per request and engine-step rates. It tells
// where TTFT goes (image prep, queue, vision encoder, prefill) and how full the steps were.

/** Series name (labels dropped, label sets summed) -> value. */
export type Scrape = Map<string, number>;

export function parseProm(text: string): Scrape {
  const out: Scrape = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const v = Number(m[3]);
    if (Number.isFinite(v)) out.set(m[1], (out.get(m[1]) ?? 0) + v);
  }
  return out;
}

/** The server's metrics, or undefined where it has none (llama-server without --metrics). */
export async function scrape(baseUrl: string): Promise<Scrape | undefined> {
  try {
    const res = await fetch(`${baseUrl}/metrics`, { signal: AbortSignal.timeout(10_000) });
    if (!res.ok) return undefined;
    const s = parseProm(await res.text());
    return s.has('caprl:engine_steps_total') ? s : undefined;
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
  /** Engine-thread ms per step in the model (llama_decode until the logits are ready), in the draws, and the rest (host work). */
  modelMsPerStep: number;
  sampleMsPerStep: number;
  hostMsPerStep: number;
}

export function breakdown(before: Scrape, after: Scrape, durationS: number): EngineBreakdown {
  const d = (name: string) => (after.get(name) ?? 0) - (before.get(name) ?? 0);
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
    hostMsPerStep: per((d('caprl:engine_busy_seconds_total') - d('caprl:engine_model_seconds_total') - d('caprl:engine_sample_seconds_total')) * 1000),
  };
}

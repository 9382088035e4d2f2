// Per-request metrics taken at the JS edge: a pass-through over a generation's event stream that
// timestamps each event as the handler receives it (performance.now()), so time to first token,
// inter-token latency, end-to-end latency and token counts come out as vLLM defines them, per
// choice (vLLM counts each of n choices as a request of its own). The engine's own phase times
// (queue, prefill, decode, image encode) pass through from each finish.
import type { EngineEvent, FinishReason } from '../engine/native-types.js';
import type { ServerMetrics } from './metrics.js';

/** What the observer needs of a Generation (src/engine/engine.ts). */
export interface ObservableGeneration {
  readonly n: number;
  cancel(): void;
  [Symbol.asyncIterator](): AsyncIterator<EngineEvent>;
}

export interface ChoiceSummary {
  index: number;
  reason: FinishReason;
  promptTokens: number;
  completionTokens: number;
}

export interface ObserveContext {
  /** performance.now() when the HTTP request arrived. */
  arrivedAt: number;
  /** performance.now() when its body had been parsed (preprocessing starts); absent: not measured. */
  parsedAt?: number;
  images: number;
  /**
   * The request's max_tokens as the engine resolved it (unset: the rest of the context), once it
   * took the prompt; null for a prompt it refused as a client fault, which is not counted (vLLM
   * refuses those before its engine).
   */
  maxTokens: number | null | Promise<number | null>;
  /** Told about each finished choice (for the request's log line). */
  onChoiceFinished?: (c: ChoiceSummary) => void;
}

interface ChoiceState {
  tokens: number;
  first?: number;
  last?: number;
}

/** Yields gen's events unchanged while recording them into `metrics`. */
export async function* observeGeneration(
  metrics: ServerMetrics,
  gen: ObservableGeneration,
  ctx: ObserveContext,
): AsyncGenerator<EngineEvent, void, undefined> {
  const submittedAt = performance.now();
  const maxTokens = await ctx.maxTokens;
  if (maxTokens === null) {
    for await (const ev of gen) yield ev;
    return;
  }
  metrics.requestStarted(
    gen.n,
    maxTokens,
    ctx.images,
    ctx.parsedAt === undefined ? undefined : Math.max(0, submittedAt - ctx.parsedAt) / 1000,
  );
  const choices = new Map<number, ChoiceState>();
  for await (const ev of gen) {
    const now = performance.now();
    let c = choices.get(ev.index);
    if (!c) choices.set(ev.index, (c = { tokens: 0 }));
    // A finish event may carry tokens it does not list (the end-of-sequence token): count from the total.
    const fresh = ev.finish ? Math.max(0, ev.finish.completionTokens - c.tokens) : ev.tokens.length;
    if (fresh > 0) {
      if (c.first === undefined) {
        c.first = now;
        metrics.firstToken((now - ctx.arrivedAt) / 1000);
        if (fresh > 1) metrics.interTokens(0, fresh - 1);
      } else {
        metrics.interTokens((now - c.last!) / 1000, fresh);
      }
      c.last = now;
      c.tokens += fresh;
    }
    if (ev.finish) {
      const f = ev.finish;
      metrics.choiceFinished({
        reason: f.reason,
        promptTokens: f.promptTokens,
        completionTokens: f.completionTokens,
        e2eSeconds: (now - ctx.arrivedAt) / 1000,
        timings: f.timings,
      });
      ctx.onChoiceFinished?.({ index: ev.index, reason: f.reason, promptTokens: f.promptTokens, completionTokens: f.completionTokens });
    }
    yield ev;
  }
}

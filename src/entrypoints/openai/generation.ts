// What chat and text completions share once a prompt is ready: handing it to the engine (n
// choices from one prefill), collecting the choices of a non-streamed request, usage (the prompt
// once, plus every choice's completion, as vLLM counts), and finish reasons.
import type { Engine, Generation } from '../../engine/engine.js';
import type { EngineEvent, EngineImage, FinishReason, SamplingParams, TokenLogprob } from '../../engine/native-types.js';
import { internalError, serviceUnavailable, type ApiError } from './errors.js';
import type { ResponseFinishReason, Usage } from './protocol.js';

export type Finish = NonNullable<EngineEvent['finish']>;

export interface ChoiceResult {
  index: number;
  text: string;
  logprobs: TokenLogprob[];
  finish: Finish;
}

export function finishToResponse(reason: FinishReason): ResponseFinishReason {
  return reason === 'length' ? 'length' : 'stop';
}

/** Seed number `counter` of the sequence the server seed `base` defines, in [0, 2^31). */
export function derivedSeed(base: number, counter: number): number {
  // splitmix32-style mixing of (base, counter); stable across runs and platforms.
  let h = (Math.imul(base | 0, 0x9e3779b9) ^ Math.imul(counter | 0, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x21f0aaad) >>> 0;
  h = Math.imul(h ^ (h >>> 15), 0x735a2d97) >>> 0;
  h = (h ^ (h >>> 15)) >>> 0;
  return h & 0x7fffffff;
}

/** Server-wide seeding (vLLM --seed): requests without `seed` draw seeds from it in arrival order. */
export class SeedSource {
  private counter = 0;
  constructor(private readonly base: number | undefined) {}

  apply(sampling: SamplingParams): SamplingParams {
    if (sampling.seed < 0 && this.base !== undefined) return { ...sampling, seed: derivedSeed(this.base, this.counter++) };
    return sampling;
  }
}

/** Usage for finished choices: prompt tokens once (the prefill is shared), completions summed. */
export function usageOf(finishes: Finish[]): Usage {
  const prompt = finishes.reduce((m, f) => Math.max(m, f.promptTokens), 0);
  const completion = finishes.reduce((s, f) => s + f.completionTokens, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** Sums usages of several prompts (a /v1/completions prompt list). */
export function addUsage(a: Usage, b: Usage): Usage {
  return {
    prompt_tokens: a.prompt_tokens + b.prompt_tokens,
    completion_tokens: a.completion_tokens + b.completion_tokens,
    total_tokens: a.total_tokens + b.total_tokens,
  };
}

/** engine.generate, with a refusal (engine closed) as 503. */
export function startGeneration(
  engine: Engine,
  input: { prompt: string; images: EngineImage[]; sampling: SamplingParams; n: number },
  signal: AbortSignal,
): Generation {
  try {
    return engine.generate(input, signal);
  } catch (err) {
    throw serviceUnavailable(`The engine is not accepting requests: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/** Every choice of a generation, in index order, once all have finished. */
export async function collectChoices(gen: Generation): Promise<ChoiceResult[]> {
  const choices: ChoiceResult[] = Array.from({ length: gen.n }, (_, index) => ({
    index, text: '', logprobs: [], finish: { reason: 'abort', promptTokens: 0, completionTokens: 0 },
  }));
  for await (const ev of gen) {
    const c = choices[ev.index];
    if (!c) continue;
    c.text += ev.text;
    if (ev.logprobs) c.logprobs.push(...ev.logprobs);
    if (ev.finish) {
      c.finish = ev.finish;
    }
  }
  return choices;
}

/** The error a failed choice turns into (abort: the server cancelled it; error: the engine failed). */
export function choiceFailure(f: Finish): ApiError | null {
  if (f.reason === 'error') return internalError(`Generation failed: ${f.error ?? 'unknown engine error'}`);
  if (f.reason === 'abort') return serviceUnavailable('The request was aborted by the server');
  return null;
}

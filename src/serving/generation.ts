// What every route that generates shares once a prompt is ready (chat and text completions, the
// workflows' captions, answers and rewards): handing it to the engine (n choices from one
// prefill), the engine's verdict on the prompt, collecting the choices of a non-streamed request,
// usage (the prompt once, plus every choice's completion, as vLLM counts), finish reasons, and
// the error a failed choice is answered with.
import type { Engine, Generation } from '../engine/engine.js';
import type { EngineEvent, EngineImage, FinishReason, PromptAccepted, SamplingParams, TokenLogprob } from '../engine/native-types.js';
import { ApiError, badRequest, internalError, serviceUnavailable } from './errors.js';
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

/** What a choice's failure is answered with, besides the finish: the request's deadline and its prompt's field. */
export interface FailureContext {
  /** The request's deadline (serving/deadline.ts): an abort after it passed is its timeout. */
  deadline?: AbortSignal;
  /** The request field the prompt came in ('messages', 'prompt', 'prompt[2]'), for a fault in the prompt. */
  promptParam?: string;
}

/**
 * The error a failed choice turns into: for an engine error, by whose fault it was (a client fault
 * is a 400 naming the field, capacity a 503, anything else a 500); for an abort, the request's
 * timeout if its deadline passed, else the server's cancel (503). Null for a choice that did not fail.
 */
export function choiceFailure(f: Finish, ctx: FailureContext = {}): ApiError | null {
  if (f.reason === 'error') {
    const message = f.error ?? 'unknown engine error';
    if (f.errorKind === 'client') {
      const param = f.errorParam === 'prompt' || f.errorParam === undefined ? ctx.promptParam ?? 'prompt' : f.errorParam;
      return badRequest(message, param, f.errorCode ?? null);
    }
    if (f.errorKind === 'capacity') return serviceUnavailable(message);
    return internalError(`Generation failed: ${message}`);
  }
  if (f.reason === 'abort') {
    if (ctx.deadline?.aborted && ctx.deadline.reason instanceof ApiError) return ctx.deadline.reason;
    return serviceUnavailable('The request was aborted by the server');
  }
  return null;
}

/**
 * Waits for the engine's verdict on a generation's prompt (counted once, by the engine, images
 * included): its counts if accepted, else the error its first finish names (choiceFailure).
 */
export async function admitted(gen: Generation, ctx: FailureContext = {}): Promise<PromptAccepted> {
  const a = await gen.admission;
  if (a.accepted) return a;
  gen.cancel();
  throw choiceFailure(a.finish, ctx) ?? serviceUnavailable('The request was aborted by the server');
}

// POST /v1/completions: text prompts, no chat template. `prompt` is a string, a list of strings,
// a list of token ids or a list of such lists; every prompt gets `n` choices from one shared
// prefill, and choice k of prompt p has index p*n + k (vLLM). Same sampling fields as chat;
// `logprobs` is the legacy integer (top alternatives per token); `echo` and `suffix` are refused.
//
// The engine takes prompts as text, so token-id prompts are decoded and must tokenize back to
// the very same ids (any canonical tokenization does); other id sequences are refused with 400.
import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine, Generation } from '../../engine/engine.js';
import type { TokenLogprob } from '../../engine/native-types.js';
import { clampLogprob } from './chat.js';
import { requestDeadline } from '../../serving/deadline.js';
import { badRequest, serviceUnavailable, type ApiError } from '../../serving/errors.js';
import {
  addUsage, admitted, choiceFailure, collectChoices, finishToResponse, SeedSource, startGeneration, usageOf, type Finish,
} from '../../serving/generation.js';
import type { CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse, Usage } from '../../serving/protocol.js';
import { SseWriter } from './sse.js';
import type { TokenText } from './tokenize.js';
import { validateTokenIds } from './tokenize.js';
import {
  describe, isObject, num, validateGenerationFields, type ValidatedGenerationFields,
} from '../../serving/validate.js';

export interface CompletionsHandlerOptions {
  engine: Engine;
  servedModelNames: readonly string[];
  tokenText: TokenText;
  maxLogprobs?: number;
  maxNumSeqs?: number;
  seed?: number;
  logRequests?: boolean;
  isAccepting?: () => boolean;
}

export interface ValidatedCompletionRequest extends ValidatedGenerationFields {
  /** The prompts as text. */
  prompts: string[];
  /** Top alternatives per token; null = no logprobs. */
  logprobs: number | null;
}

export function newTextCompletionId(): string {
  return `cmpl-${randomBytes(16).toString('hex')}`;
}

/** Prompts as text: strings as they are, token-id lists decoded (and checked to round-trip). */
function validatePrompts(v: unknown, engine: Engine, tokenText: TokenText): string[] {
  if (v === undefined || v === null) throw badRequest('`prompt` is required', 'prompt');
  const isIds = (x: unknown): boolean => Array.isArray(x) && x.length > 0 && x.every((e) => typeof e === 'number');
  let items: unknown[];
  if (typeof v === 'string' || isIds(v)) items = [v];
  else if (Array.isArray(v)) items = v;
  else throw badRequest(`\`prompt\` must be a string, a list of strings or a list of token ids, got ${describe(v)}`, 'prompt');
  if (items.length === 0) throw badRequest('`prompt` must not be empty', 'prompt');
  const marker = engine.info.mediaMarker;
  return items.map((item, i) => {
    const param = items.length === 1 && item === v ? 'prompt' : `prompt[${i}]`;
    let text: string;
    if (typeof item === 'string') {
      text = item;
    } else if (Array.isArray(item)) {
      if (item.length === 0) throw badRequest(`\`${param}\` must not be empty`, param);
      const ids = validateTokenIds(item, param, engine.info.nVocab);
      text = tokenText.detokenize(ids);
      const back = engine.tokenize(text, true, true);
      if (back.length !== ids.length || back.some((t, k) => t !== ids[k])) {
        throw badRequest(
          `\`${param}\`: this server takes token-id prompts only in the tokenizer's own segmentation ` +
          '(the ids must be what /tokenize returns for their text); send the text instead',
          param,
        );
      }
    } else {
      throw badRequest(`\`${param}\` must be a string or a list of token ids, got ${describe(item)}`, param);
    }
    if (text.length === 0) throw badRequest(`\`${param}\` must not be empty`, param);
    if (marker && text.includes(marker)) throw badRequest(`\`${param}\` may not contain the reserved marker ${marker}`, param);
    return text;
  });
}

export function validateCompletionRequest(
  body: unknown, ctx: { engine: Engine; tokenText: TokenText; servedModelNames: readonly string[]; maxLogprobs?: number; maxNumSeqs?: number },
): ValidatedCompletionRequest {
  if (!isObject(body)) throw badRequest(`Request body must be a JSON object, got ${describe(body)}`);
  const common = validateGenerationFields(body, {
    servedModelNames: ctx.servedModelNames, nVocab: ctx.engine.info.nVocab, maxLogprobs: ctx.maxLogprobs, maxN: ctx.maxNumSeqs,
  });
  if (typeof body.suffix === 'string' && body.suffix.length > 0) throw badRequest('`suffix` is not supported by this server', 'suffix');
  const maxLogprobs = ctx.maxLogprobs ?? 20;
  const logprobs = num(body, 'logprobs', { integer: true, min: 0, max: maxLogprobs, rangeText: `must be in [0, ${maxLogprobs}]` }) ?? null;
  const prompts = validatePrompts(body.prompt, ctx.engine, ctx.tokenText);
  return {
    ...common,
    sampling: { ...common.sampling, logprobs: logprobs ?? -1 },
    prompts,
    logprobs,
  };
}

/** Legacy logprobs for a run of tokens; `offset` is the text length before them. */
export function toCompletionLogprobs(lps: TokenLogprob[], topN: number, offset: number): CompletionLogprobs {
  const out: CompletionLogprobs = { text_offset: [], token_logprobs: [], tokens: [], top_logprobs: [] };
  let at = offset;
  for (const lp of lps) {
    out.text_offset.push(at);
    at += lp.text.length;
    out.tokens.push(lp.text);
    out.token_logprobs.push(clampLogprob(lp.logprob));
    // vLLM: the top alternatives, plus the sampled token itself.
    const top: Record<string, number> = {};
    for (const t of lp.top.slice(0, topN)) if (!(t.text in top)) top[t.text] = clampLogprob(t.logprob);
    if (!(lp.text in top)) top[lp.text] = clampLogprob(lp.logprob);
    out.top_logprobs.push(top);
  }
  return out;
}

export function createCompletionsHandler(opts: CompletionsHandlerOptions) {
  const { engine } = opts;
  const seeds = new SeedSource(opts.seed);
  const logRequests = opts.logRequests ?? true;

  return async function completions(request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    if (opts.isAccepting && !opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
    const req = validateCompletionRequest(request.body, opts);
    const n = req.n;
    // max_tokens unset: the rest of the context, once the engine has counted each prompt.
    const planned = req.prompts.map((prompt) => ({ prompt, sampling: seeds.apply({ ...req.sampling, maxTokens: req.maxTokens ?? -1 }) }));

    const ac = new AbortController();
    const res = reply.raw;
    res.once('close', () => {
      if (!res.writableEnded) ac.abort();
    });
    const id = newTextCompletionId();
    const created = Math.floor(Date.now() / 1000);
    const deadline = requestDeadline(request);
    const signal = AbortSignal.any([ac.signal, deadline]);
    const failureContext = { deadline };
    const gens: Generation[] = [];
    try {
      for (const p of planned) gens.push(startGeneration(engine, { prompt: p.prompt, images: [], sampling: p.sampling, n }, signal));
      // The engine counts each prompt and checks it against the context: one it refuses fails the
      // request (the first in order), before anything is sent.
      const verdicts = await Promise.allSettled(gens.map((g, p) => admitted(g, { deadline, promptParam: req.prompts.length > 1 ? `prompt[${p}]` : 'prompt' })));
      const refused = verdicts.find((v) => v.status === 'rejected');
      if (refused) throw refused.reason;
    } catch (err) {
      for (const g of gens) g.cancel();
      if (ac.signal.aborted) {
        reply.hijack();
        return undefined;
      }
      throw err;
    }
    const startedAt = performance.now();
    const logDone = (reason: string, usage: Usage): void => {
      if (!logRequests) return;
      // The request's info line comes from operations.ts; this adds the completion's details.
      request.log.debug({
        id, finish: reason, prompts: gens.length, n, promptTokens: usage.prompt_tokens, completionTokens: usage.completion_tokens,
        ms: Math.round(performance.now() - startedAt),
      }, 'completion');
    };
    const zero: Usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };

    if (!req.stream) {
      const perPrompt = await Promise.all(gens.map((g) => collectChoices(g)));
      const usage = perPrompt.reduce((u, cs) => addUsage(u, usageOf(cs.map((c) => c.finish))), zero);
      const all = perPrompt.flat();
      const aborted = all.find((c) => c.finish.reason === 'abort');
      if (aborted) {
        logDone('abort', usage);
        for (const g of gens) g.cancel();
        if (ac.signal.aborted) {
          reply.hijack();
          return undefined;
        }
        throw choiceFailure(aborted.finish, failureContext)!; // the request's timeout, or the server's cancel
      }
      const failed = all.find((c) => c.finish.reason === 'error');
      logDone(failed ? 'error' : all.map((c) => c.finish.reason).join(','), usage);
      if (failed) throw choiceFailure(failed.finish, failureContext)!;
      const choices: CompletionChoice[] = perPrompt.flatMap((cs, p) => cs.map((c) => ({
        index: p * n + c.index,
        text: c.text,
        logprobs: req.logprobs !== null ? toCompletionLogprobs(c.logprobs, req.logprobs, 0) : null,
        finish_reason: finishToResponse(c.finish.reason),
        stop_reason: c.finish.stoppedBy ?? null,
      })));
      const body: CompletionResponse = { id, object: 'text_completion', created, model: req.model, choices, usage };
      return reply.code(200).send(body);
    }

    reply.hijack();
    const writer = new SseWriter(res);
    const chunk = (choices: CompletionChoice[]): CompletionChunk => {
      const c: CompletionChunk = { id, object: 'text_completion', created, model: req.model, choices };
      if (req.includeUsage) c.usage = null;
      return c;
    };
    // Several prompts stream at once; their chunks go out one at a time.
    let open = true;
    let failure: ApiError | null = null;
    let writes: Promise<unknown> = Promise.resolve();
    const send = (payload: CompletionChunk): void => {
      writes = writes.then(async () => {
        if (open && !failure) open = await writer.send(payload);
        if (!open) for (const g of gens) g.cancel();
      });
    };
    const finishes: Finish[][] = gens.map(() => []);
    await writer.run(async () => {
      await Promise.all(gens.map(async (gen, p) => {
        const offsets = new Array<number>(n).fill(0);
        for await (const ev of gen) {
          const index = p * n + ev.index;
          const f = ev.finish;
          if (f) {
            finishes[p]!.push(f);
            const bad = choiceFailure(f, failureContext);
            if (bad) {
              if (!failure) for (const g of gens) g.cancel();
              failure ??= bad;
              continue;
            }
          }
          const lps = ev.logprobs ?? [];
          if (!f && ev.text.length === 0 && !(req.logprobs !== null && lps.length > 0)) continue;
          const lp = req.logprobs !== null ? toCompletionLogprobs(lps, req.logprobs, offsets[ev.index]!) : null;
          offsets[ev.index]! += ev.text.length;
          send(chunk([{
            index,
            text: ev.text,
            logprobs: lp,
            finish_reason: f ? finishToResponse(f.reason) : null,
            stop_reason: f ? f.stoppedBy ?? null : null,
          }]));
        }
      }));
      await writes;
      const usage = finishes.reduce((u, fs) => addUsage(u, usageOf(fs)), zero);
      const flat = finishes.flat();
      logDone(failure !== null ? (flat.some((f) => f.reason === 'error') ? 'error' : 'abort') : flat.map((f) => f.reason).join(','), usage);
      const failed = failure as ApiError | null; // assigned in the callbacks above
      if (open && !writer.isClosed) {
        if (failed) await writer.send(failed.toJSON());
        else if (req.includeUsage) {
          await writer.send({ id, object: 'text_completion', created, model: req.model, choices: [], usage });
        }
        await writer.done();
      }
    }, (err) => {
      for (const g of gens) g.cancel();
      request.log.error({ err, id }, 'streaming failed');
    });
    return undefined;
  };
}

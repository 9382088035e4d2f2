// POST /v1/chat/completions: validated request -> images prepared -> chat template -> prompt
// measured against the context -> engine -> one JSON response, or an SSE stream.
// A client that disconnects aborts its generation (AbortSignal -> engine cancel), so the
// engine frees the request's KV cells at once.
import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import type { ChatTemplateMessage, EngineImage, FinishReason, TokenLogprob } from '../../engine/native-types.js';
import { ImageInputError } from '../../images/errors.js';
import { prepareImageFromDataUri, type PrepareOptions } from '../../images/prepare.js';
import { qwenImageTokens } from '../../images/qwen-resize.js';
import { badRequest, internalError, serviceUnavailable, toApiError } from './errors.js';
import type {
  ChatCompletionResponse, ChatCompletionTokenLogprob, ResponseFinishReason, Usage,
} from './protocol.js';
import { ChatChunkBuilder, SseWriter } from './sse.js';
import { resolveMaxTokens, validateChatRequest, type ValidatedMessage } from './validate.js';

export interface ChatHandlerOptions {
  engine: Engine;
  servedModelNames: readonly string[];
  /** Image resize limits etc. (defaults: HF Qwen2.5-VL's). */
  imageOptions?: PrepareOptions;
  maxLogprobs?: number;
  /** Per-request context limit (prompt + completion); default engine.info.nCtx. */
  maxModelLen?: number;
  /** Server-wide seed (vLLM --seed): requests without `seed` get seeds drawn from it in arrival order. */
  seed?: number;
  /** False while the server shuts down: new requests get 503. */
  isAccepting?: () => boolean;
}

/** Qwen2.5-VL wraps every image in these; mtmd inserts them around the image chunk. */
const VISION_WRAP = '<|vision_start|><|vision_end|>';

export function newCompletionId(): string {
  return `chatcmpl-${randomBytes(16).toString('hex')}`;
}

/**
 * Messages as the chat template takes them: each image part becomes the media marker at its
 * place, parts are concatenated without separator (what Qwen2.5-VL's HF template renders for
 * list content, and so what vLLM prompts with).
 */
export function toTemplateMessages(
  messages: ValidatedMessage[],
  mediaMarker: string,
): { templateMessages: ChatTemplateMessage[]; images: { url: string; param: string }[] } {
  const images: { url: string; param: string }[] = [];
  const templateMessages = messages.map((m, i) => {
    let content = '';
    for (const part of m.parts) {
      if (part.type === 'text') {
        if (mediaMarker && part.text.includes(mediaMarker)) {
          throw badRequest(`message text may not contain the reserved marker ${mediaMarker}`, `messages[${i}].content`);
        }
        content += part.text;
      } else {
        images.push({ url: part.url, param: part.param });
        content += mediaMarker;
      }
    }
    return { role: m.role, content };
  });
  return { templateMessages, images };
}

/** Tokens the engine will put in the KV cache for this prompt (text + Qwen2.5-VL image tokens). */
export function countPromptTokens(engine: Engine, prompt: string, images: EngineImage[]): number {
  const marker = engine.info.mediaMarker;
  const text = images.length > 0 && marker ? prompt.split(marker).join(VISION_WRAP) : prompt;
  let n = engine.tokenize(text, true, true).length;
  for (const img of images) n += qwenImageTokens(img.width, img.height);
  return n;
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

function clampLogprob(x: number): number {
  // vLLM reports -inf as -9999.0 so the JSON stays valid.
  return Number.isFinite(x) ? x : -9999.0;
}

/** Engine logprobs -> OpenAI's choice.logprobs.content entries. */
export function toOpenAILogprobs(lps: TokenLogprob[], topN: number): ChatCompletionTokenLogprob[] {
  return lps.map((lp) => ({
    token: lp.text,
    logprob: clampLogprob(lp.logprob),
    bytes: [...Buffer.from(lp.text, 'utf8')],
    top_logprobs: lp.top.slice(0, topN).map((t) => ({
      token: t.text,
      logprob: clampLogprob(t.logprob),
      bytes: [...Buffer.from(t.text, 'utf8')],
    })),
  }));
}

function finishToResponse(reason: FinishReason): ResponseFinishReason {
  return reason === 'length' ? 'length' : 'stop';
}

async function prepareImages(
  images: { url: string; param: string }[],
  opts: PrepareOptions,
): Promise<EngineImage[]> {
  return Promise.all(
    images.map(async ({ url, param }) => {
      try {
        const p = await prepareImageFromDataUri(url, opts);
        return { width: p.width, height: p.height, rgb: p.rgb };
      } catch (err) {
        if (err instanceof ImageInputError) throw badRequest(err.message, param, err.code);
        throw err;
      }
    }),
  );
}

export function createChatCompletionHandler(opts: ChatHandlerOptions) {
  const { engine } = opts;
  const imageOptions = opts.imageOptions ?? {};
  const maxModelLen = Math.min(opts.maxModelLen ?? engine.info.nCtx, engine.info.nCtx);
  let seedCounter = 0;

  return async function chatCompletions(request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    if (opts.isAccepting && !opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
    const req = validateChatRequest(request.body, {
      servedModelNames: opts.servedModelNames,
      nVocab: engine.info.nVocab,
      maxLogprobs: opts.maxLogprobs,
    });

    // Client gone (socket closed before we finished answering) -> abort everything downstream.
    const ac = new AbortController();
    const res = reply.raw;
    const onClose = (): void => {
      if (!res.writableEnded) ac.abort();
    };
    res.once('close', onClose);

    const { templateMessages, images: imageRefs } = toTemplateMessages(req.messages, engine.info.mediaMarker);
    if (imageRefs.length > 0 && !engine.info.hasVision) {
      throw badRequest(
        'image input is not supported: the server was started without a vision projector (--mmproj)',
        imageRefs[0]!.param,
      );
    }
    const images = await prepareImages(imageRefs, imageOptions);
    let prompt: string;
    try {
      prompt = engine.applyChatTemplate(templateMessages, req.addGenerationPrompt);
    } catch (err) {
      throw badRequest(`could not apply the chat template: ${err instanceof Error ? err.message : String(err)}`, 'messages');
    }
    const promptTokens = countPromptTokens(engine, prompt, images);
    const maxTokens = resolveMaxTokens(req.maxTokens, promptTokens, maxModelLen);
    const sampling = { ...req.sampling, maxTokens };
    if (sampling.seed < 0 && opts.seed !== undefined) sampling.seed = derivedSeed(opts.seed, seedCounter++);

    if (ac.signal.aborted) {
      // The client left while images were being prepared; nobody to answer.
      reply.hijack();
      return undefined;
    }

    const id = newCompletionId();
    const created = Math.floor(Date.now() / 1000);
    let gen;
    try {
      gen = engine.generate({ prompt, images, sampling }, ac.signal);
    } catch (err) {
      throw serviceUnavailable(`The engine is not accepting requests: ${err instanceof Error ? err.message : String(err)}`);
    }
    const startedAt = performance.now();
    const logDone = (reason: string, usage: Usage | null): void => {
      request.log.info({
        id, finish: reason, promptTokens: usage?.prompt_tokens, completionTokens: usage?.completion_tokens,
        images: images.map((i) => `${i.width}x${i.height}`), ms: Math.round(performance.now() - startedAt),
      }, 'chat completion');
    };

    if (!req.stream) {
      let text = '';
      const lps: TokenLogprob[] = [];
      let finish;
      for await (const ev of gen) {
        text += ev.text;
        if (ev.logprobs) lps.push(...ev.logprobs);
        if (ev.finish) finish = ev.finish;
      }
      if (!finish || finish.reason === 'abort') {
        logDone('abort', null);
        if (ac.signal.aborted) {
          reply.hijack(); // the client is gone
          return undefined;
        }
        throw serviceUnavailable('The request was aborted by the server');
      }
      const usage: Usage = {
        prompt_tokens: finish.promptTokens,
        completion_tokens: finish.completionTokens,
        total_tokens: finish.promptTokens + finish.completionTokens,
      };
      logDone(finish.reason, usage);
      if (finish.reason === 'error') throw internalError(`Generation failed: ${finish.error ?? 'unknown engine error'}`);
      const body: ChatCompletionResponse = {
        id,
        object: 'chat.completion',
        created,
        model: req.model,
        choices: [{
          index: 0,
          message: { role: 'assistant', content: text },
          logprobs: req.logprobs ? { content: toOpenAILogprobs(lps, req.topLogprobs) } : null,
          finish_reason: finishToResponse(finish.reason),
          stop_reason: finish.stoppedBy ?? null,
        }],
        usage,
      };
      return reply.code(200).send(body);
    }

    // Streaming: we own the socket from here on; nothing may throw to Fastify.
    reply.hijack();
    const writer = new SseWriter(res);
    const chunks = new ChatChunkBuilder(id, created, req.model, req.includeUsage);
    try {
      writer.start();
      let open = await writer.send(chunks.role());
      for await (const ev of gen) {
        if (open && (ev.text.length > 0 || (req.logprobs && ev.logprobs && ev.logprobs.length > 0))) {
          const lp = req.logprobs ? { content: toOpenAILogprobs(ev.logprobs ?? [], req.topLogprobs) } : null;
          open = await writer.send(chunks.content(ev.text, lp));
          if (!open) gen.cancel();
        }
        const f = ev.finish;
        if (!f) continue;
        const usage: Usage = {
          prompt_tokens: f.promptTokens,
          completion_tokens: f.completionTokens,
          total_tokens: f.promptTokens + f.completionTokens,
        };
        logDone(f.reason, usage);
        if (!open || writer.isClosed) break;
        if (f.reason === 'error' || f.reason === 'abort') {
          const err = f.reason === 'error'
            ? internalError(`Generation failed: ${f.error ?? 'unknown engine error'}`)
            : serviceUnavailable('The request was aborted by the server');
          await writer.send(err.toJSON());
        } else {
          await writer.send(chunks.finish(finishToResponse(f.reason), f.stoppedBy ?? null));
          if (req.includeUsage) await writer.send(chunks.usage(usage));
        }
        await writer.done();
      }
    } catch (err) {
      gen.cancel();
      request.log.error({ err, id }, 'streaming failed');
      if (!writer.isClosed) {
        await writer.send(toApiError(err).toJSON()).catch(() => false);
        await writer.done().catch(() => undefined);
      }
    } finally {
      writer.end();
    }
    return undefined;
  };
}

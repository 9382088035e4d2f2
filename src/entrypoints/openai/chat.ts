// POST /v1/chat/completions: validated request -> images loaded (data:, http(s), file://) and
// prepared -> chat template -> prompt measured against the context -> engine (n choices from
// one prefill) -> one JSON response, or an SSE stream whose chunks carry each choice's index.
// A client that disconnects aborts its generation (AbortSignal -> engine cancel), so the
// engine frees the request's KV cells at once.
import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import type { ChatTemplateMessage, EngineImage, TokenLogprob } from '../../engine/native-types.js';
import { ImageInputError } from '../../images/errors.js';
import { loadImageBytes, type ImageSourceOptions } from '../../images/image-source.js';
import { prepareImage, type PrepareOptions } from '../../images/prepare.js';
import { qwenImageTokens } from '../../images/qwen-resize.js';
import { badRequest, serviceUnavailable, type ApiError } from './errors.js';
import {
  choiceFailure, collectChoices, finishToResponse, SeedSource, startGeneration, usageOf, type Finish,
} from './generation.js';
import type { ChatCompletionResponse, ChatCompletionTokenLogprob, Usage } from './protocol.js';
import { ChatChunkBuilder, SseWriter } from './sse.js';
import { resolveMaxTokens, validateChatRequest, type ValidatedMessage } from './validate.js';

export { derivedSeed } from './generation.js';

export interface ChatHandlerOptions {
  engine: Engine;
  servedModelNames: readonly string[];
  /** Image resize limits etc. (defaults: HF Qwen2.5-VL's). */
  imageOptions?: PrepareOptions;
  /** Where image URLs may be fetched / read from, and the limits on that. */
  imageSource?: ImageSourceOptions;
  /** Most images in one request (--limit-mm-per-prompt); default unlimited. */
  limitImagesPerPrompt?: number;
  maxLogprobs?: number;
  /** Most choices per request (`n`): the engine's sequence slots. */
  maxNumSeqs?: number;
  /** Per-request context limit (prompt + completion); default engine.info.nCtx. */
  maxModelLen?: number;
  /** Server-wide seed (vLLM --seed): requests without `seed` get seeds drawn from it in arrival order. */
  seed?: number;
  /** One info log line per request (default true; --disable-log-requests). */
  logRequests?: boolean;
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

export function clampLogprob(x: number): number {
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

/** Checks the image count, then loads (data:, http(s), file://) and prepares every image, in parallel. */
export async function prepareImages(
  images: { url: string; param: string }[],
  opts: { imageOptions: PrepareOptions; imageSource: ImageSourceOptions; limit?: number },
  signal: AbortSignal,
): Promise<EngineImage[]> {
  if (opts.limit !== undefined && images.length > opts.limit) {
    throw badRequest(
      `At most ${opts.limit} image(s) may be provided in one prompt (--limit-mm-per-prompt), got ${images.length}.`,
      images[opts.limit]!.param,
      'too_many_images',
    );
  }
  // The first failure stops the other downloads.
  const ac = new AbortController();
  const both = AbortSignal.any([signal, ac.signal]);
  try {
    return await Promise.all(
      images.map(async ({ url, param }) => {
        try {
          const bytes = await loadImageBytes(url, opts.imageSource, both);
          const p = await prepareImage(bytes, opts.imageOptions);
          return { width: p.width, height: p.height, rgb: p.rgb };
        } catch (err) {
          if (err instanceof ImageInputError) throw badRequest(err.message, param, err.code);
          throw err;
        }
      }),
    );
  } catch (err) {
    ac.abort();
    throw err;
  }
}

export function createChatCompletionHandler(opts: ChatHandlerOptions) {
  const { engine } = opts;
  const imageOptions = opts.imageOptions ?? {};
  const imageSource = opts.imageSource ?? {};
  const maxModelLen = Math.min(opts.maxModelLen ?? engine.info.nCtx, engine.info.nCtx);
  const seeds = new SeedSource(opts.seed);
  const logRequests = opts.logRequests ?? true;

  return async function chatCompletions(request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    if (opts.isAccepting && !opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
    const req = validateChatRequest(request.body, {
      servedModelNames: opts.servedModelNames,
      nVocab: engine.info.nVocab,
      maxLogprobs: opts.maxLogprobs,
      maxN: opts.maxNumSeqs,
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
    let images: EngineImage[];
    try {
      images = await prepareImages(imageRefs, { imageOptions, imageSource, limit: opts.limitImagesPerPrompt }, ac.signal);
    } catch (err) {
      if (ac.signal.aborted) {
        reply.hijack(); // the client left while its images were loading
        return undefined;
      }
      throw err;
    }
    let prompt: string;
    try {
      prompt = engine.applyChatTemplate(templateMessages, req.addGenerationPrompt);
    } catch (err) {
      throw badRequest(`could not apply the chat template: ${err instanceof Error ? err.message : String(err)}`, 'messages');
    }
    const promptTokens = countPromptTokens(engine, prompt, images);
    const maxTokens = resolveMaxTokens(req.maxTokens, promptTokens, maxModelLen);
    const sampling = seeds.apply({ ...req.sampling, maxTokens });

    if (ac.signal.aborted) {
      // The client left while images were being prepared; nobody to answer.
      reply.hijack();
      return undefined;
    }

    const id = newCompletionId();
    const created = Math.floor(Date.now() / 1000);
    const n = req.n;
    const gen = startGeneration(engine, { prompt, images, sampling, n }, ac.signal);
    const startedAt = performance.now();
    const logDone = (reason: string, usage: Usage | null): void => {
      if (!logRequests) return;
      // The request's info line comes from operations.ts; this adds the completion's details.
      request.log.debug({
        id, finish: reason, n, promptTokens: usage?.prompt_tokens, completionTokens: usage?.completion_tokens,
        images: images.map((i) => `${i.width}x${i.height}`), ms: Math.round(performance.now() - startedAt),
      }, 'chat completion');
    };

    if (!req.stream) {
      const choices = await collectChoices(gen);
      const usage = usageOf(choices.map((c) => c.finish));
      if (choices.some((c) => c.finish.reason === 'abort')) {
        logDone('abort', usage);
        if (ac.signal.aborted) {
          reply.hijack(); // the client is gone
          return undefined;
        }
        throw serviceUnavailable('The request was aborted by the server');
      }
      const failed = choices.find((c) => c.finish.reason === 'error');
      logDone(failed ? 'error' : choices.map((c) => c.finish.reason).join(','), usage);
      if (failed) throw choiceFailure(failed.finish)!;
      const body: ChatCompletionResponse = {
        id,
        object: 'chat.completion',
        created,
        model: req.model,
        choices: choices.map((c) => ({
          index: c.index,
          message: { role: 'assistant', content: c.text },
          logprobs: req.logprobs ? { content: toOpenAILogprobs(c.logprobs, req.topLogprobs) } : null,
          finish_reason: finishToResponse(c.finish.reason),
          stop_reason: c.finish.stoppedBy ?? null,
        })),
        usage,
      };
      return reply.code(200).send(body);
    }

    // Streaming: we own the socket from here on; nothing may throw to Fastify.
    reply.hijack();
    const writer = new SseWriter(res);
    const chunks = new ChatChunkBuilder(id, created, req.model, req.includeUsage);
    const finishes: Finish[] = [];
    await writer.run(async () => {
      let open = true;
      // vLLM opens every choice with its role chunk first.
      for (let i = 0; i < n && open; i++) open = await writer.send(chunks.role(i));
      if (!open) gen.cancel();
      let failure: ApiError | null = null;
      for await (const ev of gen) {
        if (open && !failure && (ev.text.length > 0 || (req.logprobs && ev.logprobs && ev.logprobs.length > 0))) {
          const lp = req.logprobs ? { content: toOpenAILogprobs(ev.logprobs ?? [], req.topLogprobs) } : null;
          open = await writer.send(chunks.content(ev.text, lp, ev.index));
          if (!open) gen.cancel();
        }
        const f = ev.finish;
        if (!f) continue;
        finishes.push(f);
        const bad = choiceFailure(f);
        if (bad) {
          // One failed choice fails the request: stop the others.
          if (!failure) gen.cancel();
          failure ??= bad;
          continue;
        }
        if (open && !failure) open = await writer.send(chunks.finish(finishToResponse(f.reason), f.stoppedBy ?? null, ev.index));
      }
      const usage = usageOf(finishes);
      logDone(failure ? (finishes.some((f) => f.reason === 'error') ? 'error' : 'abort') : finishes.map((f) => f.reason).join(','), usage);
      if (open && !writer.isClosed) {
        if (failure) await writer.send(failure.toJSON());
        else if (req.includeUsage) await writer.send(chunks.usage(usage));
        await writer.done();
      }
    }, (err) => {
      gen.cancel();
      request.log.error({ err, id }, 'streaming failed');
    });
    return undefined;
  };
}

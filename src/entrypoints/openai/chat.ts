// POST /v1/chat/completions: validated request -> images loaded (data:, http(s), file://) and
// prepared -> chat template -> engine (n choices from one prefill; the engine counts the prompt
// and checks it against the context, once) -> one JSON response, or an SSE stream whose chunks
// carry each choice's index.
// A client that disconnects aborts its generation (AbortSignal -> engine cancel), so the
// engine frees the request's KV cells at once.
import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import type { EngineImage, TokenLogprob } from '../../engine/native-types.js';
import type { ServingContext } from '../../serving/context.js';
import { requestDeadline } from '../../serving/deadline.js';
import { badRequest, serviceUnavailable, type ApiError } from '../../serving/errors.js';
import {
  admitted, choiceFailure, collectChoices, finishToResponse, SeedSource, startGeneration, usageOf, type Finish,
} from '../../serving/generation.js';
import { prepareImages } from '../../serving/images.js';
import { toTemplateMessages } from '../../serving/prompt.js';
import type { ChatCompletionResponse, ChatCompletionTokenLogprob, Usage } from '../../serving/protocol.js';
import { validateChatRequest } from '../../serving/validate.js';
import { ChatChunkBuilder, SseWriter } from './sse.js';

export { derivedSeed } from '../../serving/generation.js';

export function newCompletionId(): string {
  return `chatcmpl-${randomBytes(16).toString('hex')}`;
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

export function createChatCompletionHandler(opts: ServingContext) {
  const { engine } = opts;
  const { imageOptions, imageSource } = opts;
  const seeds = new SeedSource(opts.seed);
  const logRequests = opts.logRequests ?? true;

  return async function chatCompletions(request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    if (!opts.isAccepting()) throw serviceUnavailable('The server is shutting down');
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
    // max_tokens unset: the rest of the context, once the engine has counted the prompt.
    const sampling = seeds.apply({ ...req.sampling, maxTokens: req.maxTokens ?? -1 });

    if (ac.signal.aborted) {
      // The client left while images were being prepared; nobody to answer.
      reply.hijack();
      return undefined;
    }

    const id = newCompletionId();
    const created = Math.floor(Date.now() / 1000);
    const n = req.n;
    const deadline = requestDeadline(request);
    const failureContext = { deadline, promptParam: 'messages' };
    const gen = startGeneration(engine, { prompt, images, sampling, n }, AbortSignal.any([ac.signal, deadline]));
    try {
      // The engine tokenizes the prompt (images included) and checks it against the context,
      // once; a prompt it refuses is answered (400) before anything is sent.
      await admitted(gen, failureContext);
    } catch (err) {
      if (ac.signal.aborted) {
        reply.hijack();
        return undefined;
      }
      throw err;
    }
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
      const aborted = choices.find((c) => c.finish.reason === 'abort');
      if (aborted) {
        logDone('abort', usage);
        if (ac.signal.aborted) {
          reply.hijack(); // the client is gone
          return undefined;
        }
        throw choiceFailure(aborted.finish, failureContext)!; // the request's timeout, or the server's cancel
      }
      const failed = choices.find((c) => c.finish.reason === 'error');
      logDone(failed ? 'error' : choices.map((c) => c.finish.reason).join(','), usage);
      if (failed) throw choiceFailure(failed.finish, failureContext)!;
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
        const bad = choiceFailure(f, failureContext);
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

// OpenAI's server-sent-events wire format for streamed chat completions:
//   data: {"id":...,"object":"chat.completion.chunk",...,"choices":[{"index":0,"delta":{"role":"assistant","content":""},...}]}\n\n
//   data: {... "delta":{"content":"Hello"} ...}\n\n
//   data: {... "delta":{},"finish_reason":"stop"}\n\n
//   data: {... "choices":[],"usage":{...}}\n\n          (only with stream_options.include_usage)
//   data: [DONE]\n\n
// With include_usage every chunk carries "usage": null except the last, as OpenAI does.
import type { ServerResponse } from 'node:http';
import { toApiError } from '../../serving/errors.js';
import type {
  ChatCompletionChunk, ChoiceLogprobs, CompletionChunk, ErrorResponse, ResponseFinishReason, Usage,
} from '../../serving/protocol.js';

export const SSE_DONE = 'data: [DONE]\n\n';

/** One SSE event carrying a JSON payload. JSON.stringify escapes CR/LF, so one `data:` line suffices. */
export function sseEvent(payload: unknown): string {
  return `data: ${JSON.stringify(payload)}\n\n`;
}

export const SSE_HEADERS: Record<string, string> = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  connection: 'keep-alive',
  'x-accel-buffering': 'no',
};

/** Builds the chunks of one streamed chat completion (every choice carries its index). */
export class ChatChunkBuilder {
  constructor(
    readonly id: string,
    readonly created: number,
    readonly model: string,
    readonly includeUsage: boolean,
  ) {}

  private chunk(choices: ChatCompletionChunk['choices']): ChatCompletionChunk {
    const c: ChatCompletionChunk = { id: this.id, object: 'chat.completion.chunk', created: this.created, model: this.model, choices };
    if (this.includeUsage) c.usage = null;
    return c;
  }

  /** First chunk of a choice: the assistant role and empty content. */
  role(index = 0): ChatCompletionChunk {
    return this.chunk([{ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]);
  }

  content(text: string, logprobs: ChoiceLogprobs | null = null, index = 0): ChatCompletionChunk {
    return this.chunk([{ index, delta: { content: text }, logprobs, finish_reason: null }]);
  }

  finish(reason: ResponseFinishReason, stopReason: string | number | null, index = 0): ChatCompletionChunk {
    return this.chunk([{ index, delta: {}, logprobs: null, finish_reason: reason, stop_reason: stopReason }]);
  }

  usage(usage: Usage): ChatCompletionChunk {
    return { id: this.id, object: 'chat.completion.chunk', created: this.created, model: this.model, choices: [], usage };
  }
}

/**
 * Writes SSE to a raw response with backpressure. Every write resolves false once the client
 * is gone, so the producer can stop.
 */
export class SseWriter {
  private closed = false;

  constructor(private readonly res: ServerResponse) {
    res.once('close', () => {
      this.closed = true;
    });
  }

  get isClosed(): boolean {
    return this.closed || this.res.destroyed;
  }

  /**
   * Opens the stream and runs `body`. If it throws, `onError` is told (to cancel the generation
   * and log) and the stream ends with the error object, then [DONE]; the response always ends.
   */
  async run(body: () => Promise<void>, onError: (err: unknown) => void): Promise<void> {
    try {
      this.start();
      await body();
    } catch (err) {
      onError(err);
      if (!this.isClosed) {
        await this.send(toApiError(err).toJSON()).catch(() => false);
        await this.done().catch(() => undefined);
      }
    } finally {
      this.end();
    }
  }

  start(headers: Record<string, string> = {}): void {
    this.res.writeHead(200, { ...SSE_HEADERS, ...headers });
    // Headers go out at once so clients see the stream open before the first token.
    this.res.flushHeaders();
  }

  async send(payload: ChatCompletionChunk | CompletionChunk | ErrorResponse): Promise<boolean> {
    return this.write(sseEvent(payload));
  }

  async write(data: string): Promise<boolean> {
    if (this.isClosed) return false;
    if (this.res.write(data)) return true;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.res.off('drain', done);
        this.res.off('close', done);
        resolve();
      };
      this.res.on('drain', done);
      this.res.on('close', done);
    });
    return !this.isClosed;
  }

  /** Sends [DONE] and ends the response. */
  async done(): Promise<void> {
    await this.write(SSE_DONE);
    this.end();
  }

  end(): void {
    if (!this.res.writableEnded) this.res.end();
  }
}

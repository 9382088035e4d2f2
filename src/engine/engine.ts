// The engine as the rest of JS sees it: one object owning the native engine thread,
// turning its batched events into one async stream per request.
import { loadAddon } from './native.js';
import type {
  ChatTemplateMessage, EngineEvent, EngineImage, EngineInfo, EngineOptions, EngineStats, EngineTimings,
  NativeEngine, PromptAccepted, SamplingParams,
} from './native-types.js';

export type { EngineEvent, EngineImage, EngineInfo, EngineOptions, EngineStats, EngineTimings, SamplingParams, ChatTemplateMessage };

export type EngineFinish = NonNullable<EngineEvent['finish']>;

/**
 * How the engine took a request: its prompt accepted (the prompt's KV cells, images included, and
 * the output length it gets), or the finish that ended it first (a refused prompt, a cancel).
 */
export type Admission = ({ accepted: true } & PromptAccepted) | { accepted: false; finish: EngineFinish };

export interface GenerateInput {
  /** Choices sampled from one shared prefill (default 1). */
  n?: number;
  prompt: string;
  images: EngineImage[];
  sampling: SamplingParams;
}

/** Events of one request, in order; it ends after every choice's `finish` event. */
export class Generation implements AsyncIterable<EngineEvent> {
  private queue: EngineEvent[] = [];
  private wake: (() => void) | null = null;
  private done = false;
  private unfinished: number;
  /** Time the request was handed to the engine (ms, performance.now()). */
  readonly submittedAt = performance.now();
  /** Settles once the engine has checked the prompt (before any token), or ended the request first. */
  readonly admission: Promise<Admission>;
  private admit!: (a: Admission) => void;
  private admitted = false;

  constructor(readonly id: number, readonly n: number, private readonly cancelFn: (id: number) => void) {
    this.unfinished = n;
    this.admission = new Promise((resolve) => (this.admit = resolve));
  }

  private doneCallbacks: (() => void)[] = [];

  /** Runs `fn` once every choice has finished. */
  onDone(fn: () => void): void {
    if (this.done) fn();
    else this.doneCallbacks.push(fn);
  }

  /** Called by Engine when events for this request arrive. */
  push(ev: EngineEvent): void {
    if (!this.admitted && (ev.accepted || ev.finish)) {
      this.admitted = true;
      this.admit(ev.accepted ? { accepted: true, ...ev.accepted } : { accepted: false, finish: ev.finish! });
    }
    if (ev.accepted) return;  // not part of the stream: it carries no output
    this.queue.push(ev);
    if (ev.finish && --this.unfinished === 0) {
      this.done = true;
      for (const fn of this.doneCallbacks.splice(0)) fn();
    }
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  get finished(): boolean {
    return this.done;
  }

  /** Stops generation; the stream still ends with a finish event (reason 'abort'). */
  cancel(): void {
    if (!this.done) this.cancelFn(this.id);
  }

  private through: AsyncIterator<EngineEvent> | undefined;

  /** Makes every reader of this generation read its events through `fn` (the metrics observer); call before reading. */
  readThrough(fn: (events: AsyncIterable<EngineEvent>) => AsyncIterator<EngineEvent>): void {
    this.through = fn({ [Symbol.asyncIterator]: () => this.events() });
  }

  [Symbol.asyncIterator](): AsyncIterator<EngineEvent> {
    return this.through ?? this.events();
  }

  private async *events(): AsyncIterator<EngineEvent> {
    let left = this.n;
    for (;;) {
      const ev = this.queue.shift();
      if (ev) {
        yield ev;
        if (ev.finish && --left === 0) return;
        continue;
      }
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }
}

/** Told of every Generation that Engine.generate starts, before generate returns it. */
export type GenerationListener = (gen: Generation, input: GenerateInput) => void;

export class Engine {
  private readonly native: NativeEngine;
  private readonly live = new Map<number, Generation>();
  private readonly listeners = new Set<GenerationListener>();
  private nextId = 1;
  private flushQueued = false;
  private closed = false;
  readonly info: EngineInfo;

  constructor(options: EngineOptions) {
    const { Engine: NativeEngineClass } = loadAddon();
    this.native = new NativeEngineClass(options, (events) => this.dispatch(events));
    this.info = this.native.info();
  }

  private dispatch(events: EngineEvent[]): void {
    for (const ev of events) {
      const gen = this.live.get(ev.id);
      if (!gen) continue;
      gen.push(ev);
      if (gen.finished) this.live.delete(ev.id);
    }
  }

  /** Queues a request. If `signal` aborts, the request is cancelled and its KV cells freed. */
  generate(input: GenerateInput, signal?: AbortSignal): Generation {
    if (this.closed) throw new Error('engine is closed');
    const id = this.nextId++;
    const n = input.n ?? 1;
    const gen = new Generation(id, n, (i) => this.native.cancel(i));
    this.live.set(id, gen);
    this.native.submit({ id, n, prompt: input.prompt, images: input.images, sampling: input.sampling });
    this.scheduleFlush();
    if (signal) {
      if (signal.aborted) gen.cancel();
      else {
        // The listener goes when the generation ends, so a long-lived signal does not keep it alive.
        const onAbort = () => gen.cancel();
        signal.addEventListener('abort', onAbort, { once: true });
        gen.onDone(() => signal.removeEventListener('abort', onAbort));
      }
    }
    for (const listener of this.listeners) listener(gen, input);
    return gen;
  }

  // The requests of one JS turn (Promise.all over a batch, a burst of HTTP requests parsed
  // together) reach the engine thread in one hand-over, so an idle engine admits them in one step.
  private scheduleFlush(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      if (!this.closed) this.native.flush();
    });
  }

  /** Calls `listener` with every Generation started from now on (metrics, timeouts); returns its removal. */
  onGeneration(listener: GenerationListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get liveCount(): number {
    return this.live.size;
  }

  tokenize(text: string, addSpecial = false, parseSpecial = true): number[] {
    return this.native.tokenize(text, addSpecial, parseSpecial);
  }

  /** The prompt's parts as the engine takes them: token ids of each text part, KV cells of each image. */
  tokenizePrompt(prompt: string, images: { width: number; height: number }[], addSpecial = true): (number[] | number)[] {
    return this.native.tokenizePrompt(prompt, images.map(({ width, height }) => ({ width, height })), addSpecial);
  }

  detokenize(tokens: number[]): string {
    return this.native.detokenize(tokens);
  }

  applyChatTemplate(messages: ChatTemplateMessage[], addGenerationPrompt = true): string {
    return this.native.applyChatTemplate(messages, addGenerationPrompt);
  }

  stats(): EngineStats {
    return this.native.stats();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.native.close();
  }
}

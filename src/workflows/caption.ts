// Bulk captioning: records from an input source -> captions appended to a JSONL, resumable,
// shardable, never stopped by a bad record. Two captioners behind one interface: the engine
// in this process (its continuous batching serves every request in flight), or a pool of
// running OpenAI-compatible servers. Both apply the chat endpoint's rules: the same chat
// template and prompt assembly, the same sampling validation and defaults, the same
// context-length check.
import type { Engine, Generation } from '../engine/engine.js';
import type { EngineImage, SamplingParams } from '../engine/native-types.js';
import { choiceFailure, collectChoices, derivedSeed, finishToResponse, startGeneration, usageOf } from '../serving/generation.js';
import { toTemplateMessages } from '../serving/prompt.js';
import { validateChatRequest } from '../serving/validate.js';
import type { ImageFormat } from '../images/decode-data-uri.js';
import { ImageInputError } from '../images/errors.js';
import { prepareImage, type PrepareOptions } from '../images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../images/qwen-resize.js';
import { hashString } from '../model/prng.js';
import type { EndpointPool } from './endpoints.js';
import { RecordError, errorMessage } from './errors.js';
import { loadImage, type InputRecord, type InputSource, type LoadImageOptions } from './input-sources.js';
import { JsonlAppender, type JsonRecord } from './jsonl-writer.js';
import { runPool, withLinkedSignal } from './pool.js';
import { RunProgress, type ProgressSink } from './progress.js';
import { inShard, type Shard } from './shard.js';

/** CapRL's captioning prompt. */
export const DEFAULT_CAPTION_PROMPT = 'Please describe this image in detail';

/** Sampling for every caption of a run, validated once the way the chat endpoint validates a request. */
export interface SamplingSettings {
  /** OpenAI/vLLM request fields (temperature, top_p, max_tokens, ...) as sent to a server. */
  fields: Record<string, unknown>;
  /** The same fields as the engine takes them (seed -1, maxTokens 0: set per request). */
  sampling: SamplingParams;
  /** max_tokens; null = the rest of the context (vLLM). */
  maxTokens: number | null;
}

/** Validates sampling fields (temperature, top_p, max_tokens, ...) as /v1/chat/completions does. Throws ApiError. */
export function samplingSettings(fields: Record<string, unknown>): SamplingSettings {
  const clean = Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
  const v = validateChatRequest({ ...clean, messages: [{ role: 'user', content: '' }] }, { servedModelNames: ['_'] });
  return { fields: clean, sampling: v.sampling, maxTokens: v.maxTokens };
}

export interface CaptionResult {
  /** One caption per choice (n). */
  captions: string[];
  finishReasons: string[];
  promptTokens: number;
  /** Over all choices. */
  completionTokens: number;
  model: string;
}

export interface PreparedCaption {
  prompt: string;
  images: EngineImage[];
  /** null: the rest of the context (the engine counts the prompt). */
  maxTokens: number | null;
}

export interface ImageInput {
  bytes: Buffer;
  format: ImageFormat;
}

export interface Captioner {
  /** Model name reported in records. */
  readonly model: string;
  /** Default number of requests in flight. */
  readonly defaultConcurrency: number;
  /**
   * Captions one image `n` times. `seed` undefined = random. Throws RecordError for what is
   * this record's fault; anything else stops the run.
   */
  caption(image: ImageInput, prompt: string, settings: SamplingSettings, n: number, seed: number | undefined, signal?: AbortSignal): Promise<CaptionResult>;
}

/** The engine in this process. */
export class EngineCaptioner implements Captioner {
  readonly defaultConcurrency: number;
  private readonly imageOptions: PrepareOptions;

  constructor(
    private readonly engine: Engine,
    readonly model: string,
    opts: { imageOptions?: PrepareOptions; maxSeqs?: number } = {},
  ) {
    if (!engine.info.hasVision) throw new Error('the model has no vision projector: give --mmproj');
    this.imageOptions = opts.imageOptions ?? { ...LLAMA_CPP_QWEN25VL_LIMITS };
    this.defaultConcurrency = opts.maxSeqs ?? 16;
  }

  /**
   * Prompt + prepared image, as the chat endpoint builds them for [image, text] content (the
   * engine counts the prompt and checks it against the context when it starts). Throws RecordError.
   */
  async prepare(image: ImageInput | EngineImage, prompt: string, maxTokensRequested: number | null): Promise<PreparedCaption> {
    let img: EngineImage;
    if ('rgb' in image) {
      img = image;
    } else {
      try {
        const p = await prepareImage(image.bytes, this.imageOptions);
        img = { width: p.width, height: p.height, rgb: p.rgb };
      } catch (err) {
        if (err instanceof ImageInputError) throw new RecordError(err.message, err.code, { cause: err });
        throw err;
      }
    }
    let text: string;
    try {
      const { templateMessages } = toTemplateMessages(
        [{ role: 'user', parts: [{ type: 'image', url: '', param: 'image' }, { type: 'text', text: prompt }] }],
        this.engine.info.mediaMarker,
      );
      text = this.engine.applyChatTemplate(templateMessages, true);
    } catch (err) {
      throw new RecordError(`bad prompt: ${errorMessage(err)}`, 'invalid_prompt', { cause: err });
    }
    return { prompt: text, images: [img], maxTokens: maxTokensRequested };
  }

  async caption(image: ImageInput, prompt: string, settings: SamplingSettings, n: number, seed: number | undefined, signal?: AbortSignal): Promise<CaptionResult> {
    return this.generate(await this.prepare(image, prompt, settings.maxTokens), settings.sampling, n, seed, signal);
  }

  /** Starts a generation from a prepared prompt (Generation.admission: the engine's verdict on it). */
  start(p: PreparedCaption, base: SamplingParams, n: number, seed: number | undefined, signal?: AbortSignal): Generation {
    const sampling: SamplingParams = { ...base, maxTokens: p.maxTokens ?? -1, seed: seed ?? base.seed };
    return startGeneration(this.engine, { prompt: p.prompt, images: p.images, sampling, n }, signal ?? new AbortController().signal);
  }

  /** Generates from a prepared prompt. A refused prompt or a failed choice is a RecordError; a cancelled one an Error. */
  async generate(p: PreparedCaption, base: SamplingParams, n: number, seed: number | undefined, signal?: AbortSignal): Promise<CaptionResult> {
    const gen = this.start(p, base, n, seed, signal);
    const a = await gen.admission;
    if (!a.accepted) {
      if (a.finish.reason === 'abort') throw new Error('generation was cancelled');
      const refused = choiceFailure(a.finish, { promptParam: 'prompt' })!;
      throw new RecordError(refused.message, refused.status === 400 ? refused.code : 'generation_failed');
    }
    return this.collect(gen);
  }

  /** A started generation's captions. A failed choice is a RecordError; a cancelled one an Error. */
  async collect(gen: Generation): Promise<CaptionResult> {
    const choices = await collectChoices(gen);
    for (const c of choices) {
      if (c.finish.reason === 'abort') throw new Error('generation was cancelled');
      const failed = choiceFailure(c.finish);
      if (failed) throw new RecordError(failed.message, 'generation_failed');
    }
    const usage = usageOf(choices.map((c) => c.finish));
    return {
      captions: choices.map((c) => c.text),
      finishReasons: choices.map((c) => finishToResponse(c.finish.reason)),
      promptTokens: usage.prompt_tokens,
      completionTokens: usage.completion_tokens,
      model: this.model,
    };
  }
}

/** Running servers (one request per image; n choices share its prefill where the server supports `n`). */
export class EndpointCaptioner implements Captioner {
  readonly defaultConcurrency: number;

  constructor(private readonly pool: EndpointPool, readonly model: string, private readonly servedName?: string) {
    this.defaultConcurrency = 8 * pool.size;
  }

  async caption(image: ImageInput, prompt: string, settings: SamplingSettings, n: number, seed: number | undefined, signal?: AbortSignal): Promise<CaptionResult> {
    const url = `data:image/${image.format};base64,${image.bytes.toString('base64')}`;
    const r = await this.pool.chat({
      ...settings.fields,
      ...(this.servedName ? { model: this.servedName } : {}),
      ...(seed !== undefined ? { seed } : {}),
      ...(n > 1 ? { n } : {}),
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url } }, { type: 'text', text: prompt }] }],
    }, signal);
    const choices = [...(r.choices ?? [])].sort((a, b) => (a.index ?? 0) - (b.index ?? 0));
    if (choices.length !== n || choices.some((c) => typeof c.message?.content !== 'string')) {
      throw new RecordError(`the server answered with ${choices.length} choice(s) where ${n} were asked for`, 'bad_response');
    }
    return {
      captions: choices.map((c) => c.message!.content as string),
      finishReasons: choices.map((c) => c.finish_reason ?? ''),
      promptTokens: r.usage?.prompt_tokens ?? 0,
      completionTokens: r.usage?.completion_tokens ?? 0,
      model: r.model ?? this.model,
    };
  }
}

/** The seed of one record under a run seed: depends on the id only (not on order, shard or resume). */
export function recordSeed(runSeed: number | undefined, id: string): number | undefined {
  return runSeed === undefined ? undefined : derivedSeed(runSeed, hashString(id));
}

export interface CaptionJobOptions {
  source: InputSource;
  /** Output JSONL (appended to; records already there are skipped). */
  output: string;
  captioner: Captioner;
  settings: SamplingSettings;
  /** Prompt for records that bring none. */
  prompt?: string;
  /** Captions per image (default 1). */
  n?: number;
  /** Run seed: every record's seed derives from it and the record id. */
  seed?: number;
  shard?: Shard;
  /** Caption at most this many new records in this run. */
  limit?: number;
  /** Requests in flight (default: the captioner's). */
  concurrency?: number;
  /** Drop error records from the output and redo them. */
  retryErrors?: boolean;
  /** Where progress goes (default none). */
  progress?: ProgressSink | null;
  label?: string;
  /** Graceful stop: no new records; those in flight are finished and written. */
  stop?: AbortSignal;
  /** Hard stop: records in flight are cancelled and not written. */
  abort?: AbortSignal;
  load?: LoadImageOptions;
  /** Fields of the input record copied into its output record. */
  keepFields?: (rec: InputRecord) => JsonRecord | undefined;
  /** 'interval' (default) or 'always' (fsync after every line). */
  fsync?: 'always' | 'interval';
}

export interface CaptionJobResult {
  /** Records still to do when the run started (this shard, not done yet, within --limit). */
  planned: number;
  /** Records of this shard found already done in the output. */
  alreadyDone: number;
  /** Input records skipped because an earlier one had the same id. */
  duplicates: number;
  /** Records written this run (captions + errors). */
  written: number;
  errors: number;
  /** Bytes of a torn last line cut from the output. */
  tornBytes: number;
  /** Error records dropped for --retry-errors. */
  retried: number;
  promptTokens: number;
  completionTokens: number;
  seconds: number;
  /** Records written per second. */
  rate: number;
  /** True when a stop signal ended the run early. */
  stopped: boolean;
}

const round3 = (x: number): number => Math.round(x * 1000) / 1000;

/** Runs (or resumes) a captioning job. Resolves when done or stopped; throws on a run-stopping failure. */
export async function runCaptionJob(o: CaptionJobOptions): Promise<CaptionJobResult> {
  const n = o.n ?? 1;
  const { appender, resume } = await JsonlAppender.open(o.output, {
    key: (r) => (typeof r.id === 'string' ? r.id : undefined),
    drop: o.retryErrors ? (r) => r.error !== null && r.error !== undefined : undefined,
    fsync: o.fsync,
  });
  const done = resume.keys;
  const t0 = performance.now();
  const result: CaptionJobResult = {
    planned: 0, alreadyDone: 0, duplicates: 0, written: 0, errors: 0, tornBytes: resume.tornBytes, retried: resume.dropped,
    promptTokens: 0, completionTokens: 0, seconds: 0, rate: 0, stopped: false,
  };
  try {
    // First pass: how much there is to do (for the progress bar), how much was done before, and
    // how many records repeat an earlier id (each id is captioned once).
    let planned = 0;
    {
      const seen = new Set<string>();
      for await (const rec of o.source.records()) {
        if (!inShard(rec.id, o.shard)) continue;
        if (seen.has(rec.id)) {
          result.duplicates++;
          continue;
        }
        seen.add(rec.id);
        if (done.has(rec.id)) result.alreadyDone++;
        else planned++;
      }
    }
    result.planned = o.limit !== undefined ? Math.min(planned, o.limit) : planned;
    const progress = new RunProgress(o.progress ?? null, { label: o.label ?? 'caption', total: result.planned, unit: 'img' });

    let started = 0;
    const source = o.source;
    const limit = o.limit;
    async function* todo(): AsyncGenerator<InputRecord> {
      for await (const rec of source.records()) {
        if (limit !== undefined && started >= limit) return;
        if (!inShard(rec.id, o.shard)) continue;
        if (done.has(rec.id)) continue;
        done.add(rec.id); // in flight now; a later record with this id is a duplicate
        started++;
        yield rec;
      }
    }
    const write = (rec: JsonRecord, isError: boolean): void => {
      appender.append(rec);
      result.written++;
      if (isError) result.errors++;
      progress.tick(isError);
    };

    const work = async (rec: InputRecord): Promise<void> => {
      const t = performance.now();
      const base: JsonRecord = { id: rec.id, image: rec.image, ...(rec.prompt !== undefined ? { prompt: rec.prompt } : {}), ...o.keepFields?.(rec) };
      const errorRecord = (err: RecordError | string): JsonRecord => ({
        ...base, caption: null, model: o.captioner.model, prompt_tokens: null, completion_tokens: null, finish_reason: null,
        seconds: round3((performance.now() - t) / 1000), error: typeof err === 'string' ? err : err.message,
        ...(typeof err !== 'string' && err.code ? { error_code: err.code } : {}),
      });
      if (rec.error) {
        write(errorRecord(rec.error), true);
        return;
      }
      try {
        const r = await withLinkedSignal(o.abort, async (signal) => {
          const image = await loadImage(rec.location, { ...o.load, signal });
          return o.captioner.caption(image, rec.prompt ?? o.prompt ?? DEFAULT_CAPTION_PROMPT, o.settings, n, recordSeed(o.seed, rec.id), signal);
        });
        if (o.abort?.aborted) return;
        result.promptTokens += r.promptTokens;
        result.completionTokens += r.completionTokens;
        write({
          ...base,
          caption: r.captions[0] ?? '',
          ...(n > 1 ? { captions: r.captions, finish_reasons: r.finishReasons } : {}),
          model: r.model,
          prompt_tokens: r.promptTokens,
          completion_tokens: r.completionTokens,
          finish_reason: r.finishReasons[0] ?? null,
          seconds: round3((performance.now() - t) / 1000),
          error: null,
        }, false);
      } catch (err) {
        if (o.abort?.aborted) return; // cancelled: not written, redone by the next run
        if (err instanceof RecordError) {
          write(errorRecord(err), true);
          return;
        }
        throw err;
      }
    };

    try {
      await runPool(todo(), o.concurrency ?? o.captioner.defaultConcurrency, work, anySignal(o.stop, o.abort));
    } finally {
      progress.finish();
    }
    result.stopped = (o.stop?.aborted ?? false) || (o.abort?.aborted ?? false);
  } finally {
    appender.close();
    result.seconds = round3((performance.now() - t0) / 1000);
    result.rate = result.seconds > 0 ? result.written / result.seconds : 0;
  }
  return result;
}

function anySignal(...signals: (AbortSignal | undefined)[]): AbortSignal | undefined {
  const s = signals.filter((x): x is AbortSignal => x !== undefined);
  if (s.length === 0) return undefined;
  return s.length === 1 ? s[0] : AbortSignal.any(s);
}

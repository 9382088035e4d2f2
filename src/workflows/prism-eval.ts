// `caprl eval`: Prism evaluation of a captioner. Input JSONL items {image, question, answer,
// options?, id?}. Stage 1 captions each image n times (CapRL's settings by default: n=4,
// temperature 1.0, top_p 1.0, max_tokens 2048) into OUT/captions.jsonl; stage 2 has an answerer
// LLM answer each item's question from each caption alone, with "Can not answer based on the
// caption" added as the last option, and writes OUT/details.jsonl (per item: the answers, the
// letters read from them, which were right, accuracy and best-of-n) and OUT/summary.json (mean
// accuracy and best-of-n over items, as CapRL's Prism script reports them). Both stages are
// resumable (a rerun skips items already in their file) and deterministic under --seed.
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Engine } from '../engine/engine.js';
import { CliFatalError, CliUsageError, int, parseArgsOrHelp, positiveInt, requireStr, str, strings, type CommandSpec, type ParsedValue } from '../config/cli-args.js';
import { ApiError } from '../serving/errors.js';
import { ANSWER_DEFAULTS, ENDPOINT_ANSWER_MAX_TOKENS, EndpointAnswerer, EngineAnswerer, answerSettings, type Answerer } from './answerer.js';
import { DEFAULT_CAPTION_PROMPT, EndpointCaptioner, EngineCaptioner, runCaptionJob, type Captioner, type CaptionJobResult, type SamplingSettings } from './caption.js';
import { summaryLine } from './caption-cli.js';
import {
  RETRIES_FLAG, endpointOptions, engineFlags, openEngineFromFlags, samplingFlags, settingsFromFlags, stopSignals,
} from './cli-common.js';
import { EndpointError, EndpointPool } from './endpoints.js';
import { errorMessage } from './errors.js';
import { InputError, openInputSource, type InputRecord, type InputSource } from './input-sources.js';
import { JsonlAppender, readJsonl, type JsonRecord } from './jsonl-writer.js';
import { runPool } from './pool.js';
import { RunProgress, formatDuration, type ProgressSink } from './progress.js';
import { QuestionFormatError, bestOfN, meanAccuracy, parseQuestion, renderQuestion, summarizeScores, type MultipleChoice } from './qa.js';
import { computeRewards } from './qa-reward.js';

/** CapRL's Prism stage-1 settings. */
export const EVAL_CAPTION_DEFAULTS = { n: 4, maxTokens: 2048, temperature: 1.0, topP: 1.0 } as const;
export const EVAL_FILES = { captions: 'captions.jsonl', details: 'details.jsonl', summary: 'summary.json' } as const;

/** The question of an eval input record. Throws QuestionFormatError. */
export function evalQuestion(rec: InputRecord): MultipleChoice {
  const f = rec.fields ?? {};
  return parseQuestion({ question: f.question, options: f.options, answer: f.answer });
}

export interface EvalAnswerOptions {
  source: InputSource;
  outDir: string;
  answerer: Answerer;
  seed: number;
  shuffle?: boolean;
  /** Answers in flight (default: the answerer's); 1 answers one question at a time. */
  concurrency?: number;
  retryErrors?: boolean;
  progress?: ProgressSink | null;
  stop?: AbortSignal;
  abort?: AbortSignal;
}

export interface EvalAnswerResult {
  written: number;
  errors: number;
  alreadyDone: number;
  /** Items without captions yet (stage 1 not run on them). */
  notCaptioned: number;
  stopped: boolean;
}

/** Stage 2: answer every captioned item not yet in details.jsonl. */
export async function runEvalAnswers(o: EvalAnswerOptions): Promise<EvalAnswerResult> {
  const captions = new Map<string, JsonRecord>();
  try {
    await readJsonl(path.join(o.outDir, EVAL_FILES.captions), (r) => {
      if (typeof r.id === 'string') captions.set(r.id, r);
    });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const { appender, resume } = await JsonlAppender.open(path.join(o.outDir, EVAL_FILES.details), {
    key: (r) => (typeof r.id === 'string' ? r.id : undefined),
    drop: o.retryErrors ? (r) => r.error !== null && r.error !== undefined : undefined,
  });
  const result: EvalAnswerResult = { written: 0, errors: 0, alreadyDone: 0, notCaptioned: 0, stopped: false };
  try {
    const todo: InputRecord[] = [];
    const seen = new Set<string>();
    for await (const rec of o.source.records()) {
      if (seen.has(rec.id)) continue;
      seen.add(rec.id);
      if (resume.keys.has(rec.id)) result.alreadyDone++;
      else if (!captions.has(rec.id)) result.notCaptioned++;
      else todo.push(rec);
    }
    const progress = new RunProgress(o.progress ?? null, { label: 'eval answers', total: todo.length, unit: 'item' });
    const write = (rec: JsonRecord, isError: boolean): void => {
      appender.append(rec);
      result.written++;
      if (isError) result.errors++;
      progress.tick(isError);
    };
    const stopOrAbort = o.stop && o.abort ? AbortSignal.any([o.stop, o.abort]) : (o.stop ?? o.abort);
    const answers = o.concurrency ?? o.answerer.defaultConcurrency;
    const firstCaptions = [...captions.values()].find((c) => Array.isArray(c.captions))?.captions as unknown[] | undefined;
    const n = Math.max(1, firstCaptions?.length ?? 1);
    const perItem = Math.min(n, answers);
    const items = Math.max(1, Math.floor(answers / perItem));
    try {
      await runPool(todo, items, async (rec) => {
        const cap = captions.get(rec.id)!;
        const base: JsonRecord = { id: rec.id, image: rec.image };
        const fail = (stage: string, message: string): JsonRecord => ({ ...base, error: `${stage}: ${message}`, error_stage: stage });
        if (cap.error !== null && cap.error !== undefined) {
          write(fail('caption', String(cap.error)), true);
          return;
        }
        let mc: MultipleChoice;
        try {
          mc = evalQuestion(rec);
        } catch (err) {
          if (!(err instanceof QuestionFormatError)) throw err;
          write(fail('question', `${err.field}: ${err.message}`), true);
          return;
        }
        const texts = Array.isArray(cap.captions) ? (cap.captions as unknown[]).map(String) : [String(cap.caption ?? '')];
        const rendered = renderQuestion(mc);
        let rewards;
        try {
          rewards = await computeRewards(
            texts.map((caption, k) => ({ caption, questions: [mc], key: `${rec.id}/${k}` })),
            o.answerer,
            { seed: o.seed, shuffle: o.shuffle, concurrency: perItem, signal: o.abort },
          );
        } catch (err) {
          if (o.abort?.aborted) return;
          throw err;
        }
        const details = rewards.map((r) => r.details[0]!);
        const correct = details.map((d) => d.correct);
        write({
          ...base,
          question: rendered.text,
          answer: rendered.answer,
          cannot_answer: rendered.cannotAnswer,
          captions: texts,
          ...(o.shuffle ? { asked: details.map((d) => d.asked), expected: details.map((d) => d.expected) } : {}),
          responses: details.map((d) => d.response),
          predictions: details.map((d) => d.predicted),
          correct,
          accuracy: meanAccuracy(correct),
          best_of_n: bestOfN(correct),
          ...(details.some((d) => d.error) ? { answer_errors: details.map((d) => d.error ?? null) } : {}),
          error: null,
        }, false);
      }, stopOrAbort);
    } finally {
      progress.finish();
    }
    result.stopped = (o.stop?.aborted ?? false) || (o.abort?.aborted ?? false);
  } finally {
    appender.close();
  }
  return result;
}

export interface EvalSummary {
  /** Items in details.jsonl. */
  items: number;
  /** Items scored (no error). */
  scored: number;
  errors: number;
  n: number;
  mean_accuracy: number;
  best_of_n: number;
  per_sample_accuracy: number[];
  /** Fraction of answers that chose "Can not answer based on the caption". */
  cannot_answer_rate: number;
  /** Fraction of answers from which no letter could be read. */
  unparsed_rate: number;
  [k: string]: unknown;
}

/** Summary over every record of details.jsonl. */
export async function summarizeEval(outDir: string, extra: Record<string, unknown> = {}): Promise<EvalSummary> {
  const perItem: boolean[][] = [];
  let items = 0;
  let errors = 0;
  let answers = 0;
  let cannot = 0;
  let unparsed = 0;
  await readJsonl(path.join(outDir, EVAL_FILES.details), (r) => {
    items++;
    if (r.error !== null && r.error !== undefined) {
      errors++;
      return;
    }
    const correct = Array.isArray(r.correct) ? (r.correct as unknown[]).map((x) => x === true) : [];
    perItem.push(correct);
    const preds = Array.isArray(r.predictions) ? (r.predictions as unknown[]) : [];
    answers += preds.length;
    cannot += preds.filter((p) => p !== null && p === r.cannot_answer).length;
    unparsed += preds.filter((p) => p === null).length;
  });
  const s = summarizeScores(perItem);
  return {
    items,
    scored: s.items,
    errors,
    n: perItem.reduce((m, c) => Math.max(m, c.length), 0),
    mean_accuracy: s.mean_accuracy,
    best_of_n: s.best_of_n,
    per_sample_accuracy: s.per_sample_accuracy,
    cannot_answer_rate: answers ? cannot / answers : 0,
    unparsed_rate: answers ? unparsed / answers : 0,
    ...extra,
  };
}

function writeJsonAtomic(file: string, value: unknown): void {
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, `${JSON.stringify(value, null, 2)}\n`);
  renameSync(tmp, file);
}

export const EVAL_SPEC: CommandSpec = {
  usage: 'caprl eval',
  summary:
    'Prism evaluation: caption each image n times (stage 1), have an answerer LLM answer each multiple-choice ' +
    'question from the captions alone (stage 2), and report mean accuracy and best-of-n. Input JSONL: ' +
    '{"image", "question" (with lettered options, or give "options"), "answer" (a letter), "id"?}. Resumable, ' +
    'deterministic under --seed.',
  positionals: [],
  flags: [
    { name: 'input', aliases: ['i'], type: 'string', dest: 'input', metavar: 'DATA.jsonl', help: 'evaluation items (required)' },
    { name: 'output-dir', aliases: ['o'], type: 'string', dest: 'outDir', metavar: 'DIR', help: `where ${EVAL_FILES.captions}, ${EVAL_FILES.details} and ${EVAL_FILES.summary} go (required)` },
    { name: 'stage', type: 'string', dest: 'stage', choices: ['all', 'caption', 'answer'], help: 'run both stages (all, default), only the captions, or only the answers' },
    { name: 'endpoint', type: 'strings', dest: 'endpoint', metavar: 'URL', help: 'caption through these running servers instead of --model/--mmproj' },
    { name: 'api-key', type: 'string', dest: 'apiKey', help: 'bearer token for --endpoint / --answerer-endpoint (default: $OPENAI_API_KEY)' },
    RETRIES_FLAG,
    { name: 'n', type: 'int', dest: 'n', help: `captions per image (default: ${EVAL_CAPTION_DEFAULTS.n})` },
    { name: 'prompt', type: 'string', dest: 'prompt', help: `captioning prompt (default: "${DEFAULT_CAPTION_PROMPT}")` },
    ...samplingFlags(EVAL_CAPTION_DEFAULTS),
    { name: 'seed', type: 'int', dest: 'seed', help: 'seed for captions, option shuffles and answers (default: 0)' },
    { name: 'answerer-model', type: 'string', dest: 'answererModel', metavar: 'MODEL', help: 'answerer run in this process: a text GGUF (or Hugging Face folder / repo id), e.g. Qwen2.5-3B-Instruct' },
    { name: 'answerer-endpoint', type: 'strings', dest: 'answererEndpoint', metavar: 'URL', help: 'answerer behind running OpenAI-compatible servers' },
    { name: 'answerer-name', type: 'string', dest: 'answererName', help: 'model name sent to --answerer-endpoint (default: the server\'s)' },
    { name: 'answerer-temperature', type: 'float', dest: 'answererTemperature', help: `answerer temperature (default: ${ANSWER_DEFAULTS.temperature})` },
    { name: 'answerer-top-p', type: 'float', dest: 'answererTopP', help: `answerer top_p (default: ${ANSWER_DEFAULTS.topP})` },
    { name: 'answerer-max-tokens', type: 'int', dest: 'answererMaxTokens', help: `answer length (default: ${ANSWER_DEFAULTS.maxTokens} in this process, where the reply is primed with "The answer is"; ${ENDPOINT_ANSWER_MAX_TOKENS} for an endpoint)` },
    { name: 'shuffle-options', type: 'bool', dest: 'shuffle', help: 'shuffle each question\'s options per caption (seeded), as CapRL\'s reward can' },
    { name: 'concurrency', type: 'int', dest: 'concurrency', help: 'stage 1 images in flight (default: --max-num-seqs / n in this process)' },
    { name: 'answer-concurrency', type: 'int', dest: 'answerConcurrency', help: 'stage 2 answers in flight (default: the answerer\'s; 1 = one at a time)' },
    { name: 'limit', type: 'int', dest: 'limit', help: 'caption at most this many new items in this run' },
    { name: 'retry-errors', type: 'bool', dest: 'retryErrors', help: 'redo items that failed (caption or answer errors)' },
    { name: 'image-root', type: 'string', dest: 'imageRoot', metavar: 'DIR', help: "folder relative image paths start from (default: the input's folder)" },
    { name: 'progress', type: 'bool', dest: 'progress', help: 'progress on stderr (default: on; --no-progress)' },
    ...engineFlags(),
  ],
};

async function openAnswerer(v: Record<string, ParsedValue>): Promise<{ answerer: Answerer; engine?: Engine }> {
  const model = str(v, 'answererModel');
  const endpoints = strings(v, 'answererEndpoint');
  const asUsage = <T>(f: () => T): T => {
    try {
      return f();
    } catch (err) {
      if (err instanceof ApiError) throw new CliUsageError(`answerer sampling: ${err.message}`);
      throw err;
    }
  };
  const input = { temperature: v.answererTemperature as number | undefined, topP: v.answererTopP as number | undefined, maxTokens: int(v, 'answererMaxTokens') };
  if (endpoints) {
    const settings = asUsage(() => answerSettings(input, ENDPOINT_ANSWER_MAX_TOKENS));
    const pool = new EndpointPool(endpoints, endpointOptions(v));
    const name = str(v, 'answererName');
    return { answerer: new EndpointAnswerer(pool, name ?? endpoints[0]!, settings, name) };
  }
  const settings = asUsage(() => answerSettings(input));
  const values: Record<string, ParsedValue> = { ...v, model: model! };
  delete values.mmproj;
  delete values.servedModelName;
  const { engine, cfg } = await openEngineFromFlags(values);
  return {
    answerer: new EngineAnswerer(engine, path.basename(cfg.model), settings, { maxSeqs: cfg.maxNumSeqs }),
    engine,
  };
}

export async function runEvalCommand(argv: readonly string[]): Promise<number> {
  const v = parseArgsOrHelp(EVAL_SPEC, argv);
  if (!v) return 0;
  const input = requireStr(v, 'input', 'an input file is required: -i DATA.jsonl');
  const outDir = requireStr(v, 'outDir', 'an output folder is required: -o DIR');
  const stage = str(v, 'stage') ?? 'all';
  const captionStage = stage !== 'answer';
  const answerStage = stage !== 'caption';
  const endpoints = strings(v, 'endpoint');
  if (captionStage) {
    if (endpoints && (str(v, 'model') || str(v, 'mmproj'))) throw new CliUsageError('give either --endpoint or --model/--mmproj for the captioner, not both');
    if (!endpoints && !str(v, 'model')) throw new CliUsageError('a captioner is required: --model MODEL.gguf --mmproj MMPROJ.gguf, or --endpoint URL');
  }
  if (answerStage) {
    const m = str(v, 'answererModel');
    const e = strings(v, 'answererEndpoint');
    if (!m === !e) throw new CliUsageError('give one answerer: --answerer-model MODEL (in this process) or --answerer-endpoint URL');
  }
  const n = positiveInt(v, 'n', 'n') ?? EVAL_CAPTION_DEFAULTS.n;
  const settings: SamplingSettings = settingsFromFlags(v, EVAL_CAPTION_DEFAULTS);
  const seed = int(v, 'seed') ?? 0;
  const limit = int(v, 'limit');
  if (limit !== undefined && limit < 0) throw new CliUsageError(`argument --limit: must be non-negative, got ${limit}`);
  let source: InputSource;
  try {
    source = await openInputSource(input, { imageRoot: str(v, 'imageRoot'), idFrom: 'line' });
  } catch (err) {
    if (err instanceof InputError) throw new CliUsageError(err.message);
    throw err;
  }
  if (source.kind !== 'list') throw new CliUsageError(`${input}: the eval input must be a JSONL file of {image, question, answer} items`);
  mkdirSync(outDir, { recursive: true });
  const progress = v.progress === false ? null : process.stderr;
  const log = (s: string): void => void process.stderr.write(`caprl eval: ${s}\n`);
  const signals = stopSignals(log);
  const t0 = performance.now();
  let captionModel: string | undefined;
  let answererName: string | undefined;
  try {
    let capResult: CaptionJobResult | undefined;
    if (captionStage) {
      let engine: Engine | undefined;
      let captioner: Captioner;
      let concurrency = positiveInt(v, 'concurrency', 'concurrency');
      if (endpoints) {
        const served = strings(v, 'servedModelName')?.[0];
        captioner = new EndpointCaptioner(new EndpointPool(endpoints, endpointOptions(v)), served ?? endpoints[0]!, served);
      } else {
        const opened = await openEngineFromFlags(v);
        engine = opened.engine;
        if (n > opened.cfg.maxNumSeqs) {
          await engine.close();
          throw new CliUsageError(`--n ${n} is more than --max-num-seqs ${opened.cfg.maxNumSeqs}`);
        }
        const name = opened.cfg.servedModelNames[0];
        try {
          captioner = new EngineCaptioner(engine, !name || name === opened.cfg.model ? path.basename(opened.cfg.model) : name, {
            maxSeqs: opened.cfg.maxNumSeqs,
          });
        } catch (err) {
          await engine.close();
          throw new CliUsageError(errorMessage(err));
        }
        concurrency ??= Math.max(1, Math.ceil(opened.cfg.maxNumSeqs / n));
      }
      captionModel = captioner.model;
      try {
        capResult = await runCaptionJob({
          source, output: path.join(outDir, EVAL_FILES.captions), captioner, settings, n, seed, limit, concurrency,
          prompt: str(v, 'prompt'), retryErrors: v.retryErrors === true, progress, label: 'eval captions',
          stop: signals.stop, abort: signals.abort,
        });
      } finally {
        await engine?.close(); // the answerer may need the memory
      }
      process.stderr.write(summaryLine('caprl eval: captions', path.join(outDir, EVAL_FILES.captions), capResult));
      if (capResult.stopped) return 130;
    }
    if (!answerStage) return 0;
    let opened: { answerer: Answerer; engine?: Engine };
    try {
      opened = await openAnswerer(v);
    } catch (err) {
      if (err instanceof CliUsageError || err instanceof CliFatalError) throw err;
      throw new CliFatalError(`could not open the answerer: ${errorMessage(err)}`, { cause: err });
    }
    answererName = opened.answerer.name;
    let ans: EvalAnswerResult;
    try {
      ans = await runEvalAnswers({
        source, outDir, answerer: opened.answerer, seed, shuffle: v.shuffle === true,
        concurrency: positiveInt(v, 'answerConcurrency', 'answer-concurrency'),
        retryErrors: v.retryErrors === true, progress, stop: signals.stop, abort: signals.abort,
      });
    } finally {
      await opened.engine?.close();
    }
    const summary = await summarizeEval(outDir, {
      not_captioned: ans.notCaptioned,
      seed,
      shuffle_options: v.shuffle === true,
      captioner: captionModel ?? null,
      answerer: answererName,
      caption_settings: { n, prompt: str(v, 'prompt') ?? DEFAULT_CAPTION_PROMPT, ...settings.fields },
      seconds: Math.round((performance.now() - t0) / 10) / 100,
    });
    writeJsonAtomic(path.join(outDir, EVAL_FILES.summary), summary);
    process.stderr.write(
      `caprl eval: ${summary.scored} items scored (${summary.errors} errors${ans.notCaptioned ? `, ${ans.notCaptioned} not captioned yet` : ''}): ` +
      `mean accuracy ${summary.mean_accuracy.toFixed(4)}, best-of-${summary.n} ${summary.best_of_n.toFixed(4)} ` +
      `in ${formatDuration((performance.now() - t0) / 1000)}; ${path.join(outDir, EVAL_FILES.summary)}\n`,
    );
    return ans.stopped ? 130 : 0;
  } catch (err) {
    if (err instanceof EndpointError) throw new CliFatalError(`${err.message} (the items done so far are kept: rerun to resume)`, { cause: err });
    throw err;
  } finally {
    signals.dispose();
  }
}

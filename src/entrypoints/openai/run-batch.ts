// `caprl run-batch -i in.jsonl -o out.jsonl`: vLLM's run-batch (the OpenAI batch file format)
// on the engine in this process. Input lines {custom_id, method, url, body}; output lines
// {id, custom_id, response: {status_code, request_id, body}, error}, in input order.
// Each request goes through the HTTP server's own app (buildServer + Fastify's inject): the same
// routing, body limits, validation, handler and error objects as a request over the network,
// without a socket. Resumable: output lines are keyed by custom_id (unique, as OpenAI requires),
// and a rerun skips the custom_ids already in the output.
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import { CliFatalError, CliUsageError, int, parseArgsOrHelp, positiveInt, requireStr, str, type CommandSpec } from '../../config/cli-args.js';
import { buildServer } from './server.js';
import { engineFlags, openEngineFromFlags, stopSignals } from '../../workflows/cli-common.js';
import { errorMessage } from '../../workflows/errors.js';
import { JsonlAppender, type JsonRecord } from '../../workflows/jsonl-writer.js';
import { runPool } from '../../workflows/pool.js';
import { RunProgress, formatDuration, formatRate, type ProgressSink } from '../../workflows/progress.js';

export const SUPPORTED_BATCH_URLS = ['/v1/chat/completions'] as const;

export interface BatchRequestLine {
  custom_id: string;
  method: string;
  url: string;
  body: unknown;
  /** 1-based line in the input file. */
  line: number;
}

export class BatchInputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BatchInputError';
  }
}

/** Parses one input line (blank: null); throws BatchInputError naming the line for a malformed one. */
export function parseBatchLine(raw: string, line: number): BatchRequestLine | null {
  const s = raw.trim();
  if (s === '') return null;
  let v: unknown;
  try {
    v = JSON.parse(s);
  } catch (err) {
    throw new BatchInputError(`line ${line}: not valid JSON (${errorMessage(err)})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new BatchInputError(`line ${line}: expected a JSON object`);
  const o = v as Record<string, unknown>;
  if (typeof o.custom_id !== 'string' || o.custom_id === '') throw new BatchInputError(`line ${line}: "custom_id" must be a non-empty string`);
  if (typeof o.method !== 'string') throw new BatchInputError(`line ${line}: "method" must be a string`);
  if (typeof o.url !== 'string') throw new BatchInputError(`line ${line}: "url" must be a string`);
  if (o.body === undefined) throw new BatchInputError(`line ${line}: "body" is required`);
  return { custom_id: o.custom_id, method: o.method, url: o.url, body: o.body, line };
}

async function* readBatchLines(file: string): AsyncGenerator<BatchRequestLine> {
  const rl = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
  let n = 0;
  for await (const raw of rl) {
    n++;
    const r = parseBatchLine(raw, n);
    if (r) yield r;
  }
}

const hex = (): string => randomBytes(16).toString('hex');

/** One output line for a request that got `status` and `json` back. */
export function batchOutput(customId: string, status: number, json: unknown): JsonRecord {
  const ok = status === 200;
  return {
    id: `caprl-${hex()}`,
    custom_id: customId,
    response: { status_code: status, request_id: `caprl-batch-${hex()}`, body: ok ? json : null },
    error: ok ? null : json,
  };
}

/** An output line for a request refused before it reached the handler (vLLM: status 400, error a message). */
export function batchErrorOutput(customId: string, message: string): JsonRecord {
  return {
    id: `caprl-${hex()}`,
    custom_id: customId,
    response: { status_code: 400, request_id: `caprl-batch-${hex()}`, body: null },
    error: message,
  };
}

/** Runs one batch request through the app. */
export async function runBatchRequest(app: FastifyInstance, req: BatchRequestLine): Promise<JsonRecord> {
  if (!(SUPPORTED_BATCH_URLS as readonly string[]).includes(req.url)) {
    return batchErrorOutput(req.custom_id, `URL ${req.url} was used. Supported endpoints: ${SUPPORTED_BATCH_URLS.join(', ')}`);
  }
  if (req.method.toUpperCase() !== 'POST') {
    return batchErrorOutput(req.custom_id, `Method ${req.method} was used. Only POST is supported`);
  }
  if (typeof req.body === 'object' && req.body !== null && (req.body as { stream?: unknown }).stream === true) {
    return batchErrorOutput(req.custom_id, 'Request must not be sent in stream mode');
  }
  const res = await app.inject({
    method: 'POST',
    url: req.url,
    headers: { 'content-type': 'application/json' },
    payload: JSON.stringify(req.body),
  });
  let json: unknown;
  try {
    json = res.json();
  } catch {
    json = { error: { message: res.body || `HTTP ${res.statusCode}`, type: 'internal_server_error', param: null, code: null } };
  }
  return batchOutput(req.custom_id, res.statusCode, json);
}

export interface RunBatchOptions {
  input: string;
  output: string;
  app: FastifyInstance;
  concurrency: number;
  limit?: number;
  progress?: ProgressSink | null;
  stop?: AbortSignal;
  fsync?: 'always' | 'interval';
}

export interface RunBatchResult {
  requests: number;
  alreadyDone: number;
  written: number;
  /** Output lines with a status other than 200. */
  failed: number;
  seconds: number;
  stopped: boolean;
}

/** Runs (or resumes) a batch file; output lines are written in input order. Throws BatchInputError for a malformed input. */
export async function runBatchFile(o: RunBatchOptions): Promise<RunBatchResult> {
  const t0 = performance.now();
  const { appender, resume } = await JsonlAppender.open(o.output, {
    key: (r) => (typeof r.custom_id === 'string' ? r.custom_id : undefined),
    fsync: o.fsync,
  });
  const result: RunBatchResult = { requests: 0, alreadyDone: 0, written: 0, failed: 0, seconds: 0, stopped: false };
  try {
    // First pass: the whole input must be well-formed with unique custom_ids before any work.
    const seen = new Set<string>();
    let pending = 0;
    for await (const r of readBatchLines(o.input)) {
      if (seen.has(r.custom_id)) throw new BatchInputError(`line ${r.line}: custom_id "${r.custom_id}" is used twice (custom_ids must be unique)`);
      seen.add(r.custom_id);
      result.requests++;
      if (resume.keys.has(r.custom_id)) result.alreadyDone++;
      else pending++;
    }
    seen.clear();
    const planned = o.limit !== undefined ? Math.min(o.limit, pending) : pending;
    const progress = new RunProgress(o.progress ?? null, { label: 'run-batch', total: planned, unit: 'req' });

    // In-order writing: results wait in `ready` until every earlier request has been written.
    const ready = new Map<number, JsonRecord>();
    let nextToWrite = 0;
    let taken = 0;
    const flush = (): void => {
      for (let r = ready.get(nextToWrite); r !== undefined; r = ready.get(nextToWrite)) {
        ready.delete(nextToWrite++);
        appender.append(r);
        result.written++;
        const status = (r.response as { status_code?: number } | null)?.status_code;
        if (status !== 200) result.failed++;
        progress.tick(status !== 200);
      }
    };
    const limit = o.limit;
    async function* todo(): AsyncGenerator<{ seq: number; req: BatchRequestLine }> {
      for await (const req of readBatchLines(o.input)) {
        if (limit !== undefined && taken >= limit) return;
        if (resume.keys.has(req.custom_id)) continue;
        yield { seq: taken++, req };
      }
    }
    try {
      await runPool(todo(), o.concurrency, async ({ seq, req }) => {
        ready.set(seq, await runBatchRequest(o.app, req));
        flush();
      }, o.stop);
    } finally {
      progress.finish();
    }
    result.stopped = o.stop?.aborted ?? false;
  } finally {
    appender.close();
    result.seconds = (performance.now() - t0) / 1000;
  }
  return result;
}

export const RUN_BATCH_SPEC: CommandSpec = {
  usage: 'caprl run-batch',
  summary:
    "Run a file of OpenAI batch requests (vLLM's run-batch format) through the engine in this process, " +
    'with the HTTP server\'s handlers. Output lines come in input order; a rerun skips the custom_ids already in the output.',
  positionals: [],
  flags: [
    { name: 'input-file', aliases: ['i'], type: 'string', dest: 'input', metavar: 'IN.jsonl', help: 'batch input: one {"custom_id", "method", "url", "body"} per line (required)' },
    { name: 'output-file', aliases: ['o'], type: 'string', dest: 'output', metavar: 'OUT.jsonl', help: 'batch output, appended to (required)' },
    { name: 'seed', type: 'int', dest: 'seed', help: 'server-wide seed for requests without `seed` (as caprl serve --seed)' },
    { name: 'concurrency', type: 'int', dest: 'concurrency', help: 'requests in flight (default: 2 x --max-num-seqs, as vLLM)' },
    { name: 'limit', type: 'int', dest: 'limit', help: 'run at most this many new requests in this run' },
    { name: 'fsync', type: 'string', dest: 'fsync', choices: ['interval', 'always'], help: 'flush the output to disk every second (interval, default) or after every line (always)' },
    { name: 'progress', type: 'bool', dest: 'progress', help: 'progress on stderr (default: on; --no-progress)' },
    ...engineFlags(),
  ],
};

export async function runRunBatchCommand(argv: readonly string[]): Promise<number> {
  const v = parseArgsOrHelp(RUN_BATCH_SPEC, argv);
  if (!v) return 0;
  const input = requireStr(v, 'input', 'an input file is required: -i IN.jsonl');
  const output = requireStr(v, 'output', 'an output file is required: -o OUT.jsonl');
  requireStr(v, 'model', 'a model is required: --model MODEL.gguf [--mmproj MMPROJ.gguf]');
  const concurrency = positiveInt(v, 'concurrency', 'concurrency');
  const limit = int(v, 'limit');
  if (limit !== undefined && limit < 0) throw new CliUsageError(`argument --limit: must be non-negative, got ${limit}`);

  const { engine, cfg } = await openEngineFromFlags(v);
  let app: FastifyInstance | undefined;
  const signals = stopSignals((s) => void process.stderr.write(`caprl run-batch: ${s}\n`));
  // A second signal exits at once: every line written so far is whole (one write per line).
  signals.abort.addEventListener('abort', () => process.exit(130), { once: true });
  try {
    app = buildServer({
      engine: engine as Engine,
      servedModelNames: cfg.servedModelNames,
      modelPath: cfg.model,
      seed: int(v, 'seed'),
    });
    await app.ready();
    const r = await runBatchFile({
      input,
      output,
      app,
      concurrency: concurrency ?? 2 * cfg.maxNumSeqs,
      limit,
      progress: v.progress === false ? null : process.stderr,
      stop: signals.stop,
      fsync: str(v, 'fsync') === 'always' ? 'always' : 'interval',
    });
    process.stderr.write(
      `caprl run-batch: ${r.written} of ${r.requests} requests written to ${output} (${r.failed} failed) in ` +
      `${formatDuration(r.seconds)}, ${formatRate(r.seconds > 0 ? r.written / r.seconds : 0, 'req')}` +
      `${r.alreadyDone ? `; ${r.alreadyDone} already done` : ''}${r.stopped ? '; stopped early: rerun to resume' : ''}\n`,
    );
    return r.stopped ? 130 : 0;
  } catch (err) {
    if (err instanceof BatchInputError) throw new CliFatalError(`${input}: ${err.message}`);
    throw err;
  } finally {
    signals.dispose();
    await app?.close();
    await engine.close();
  }
}

// `caprl caption INPUT -o out.jsonl`: bulk captioning, in this process or against servers.
import path from 'node:path';
import type { Engine } from '../engine/engine.js';
import { CliFatalError, CliUsageError, int, parseArgsOrHelp, positiveInt, requireStr, str, strings, type CommandSpec } from '../config/cli-args.js';
import { DEFAULT_CAPTION_PROMPT, EndpointCaptioner, EngineCaptioner, runCaptionJob, type Captioner, type CaptionJobResult } from './caption.js';
import {
  RETRIES_FLAG, endpointOptions, engineFlags, openEngineFromFlags, samplingFlags, settingsFromFlags, shardFromFlags, stopSignals,
} from './cli-common.js';
import { EndpointError, EndpointPool } from './endpoints.js';
import { InputError, openInputSource } from './input-sources.js';
import { formatDuration, formatRate } from './progress.js';

export const CAPTION_DEFAULTS = { maxTokens: 2048, temperature: 1.0, topP: 1.0 } as const;

export const CAPTION_SPEC: CommandSpec = {
  usage: 'caprl caption',
  summary:
    'Caption a folder, a glob or a JSONL list of images into a JSONL file, with the engine in this process ' +
    '(--model/--mmproj, as caprl serve) or against running servers (--endpoint). Resumable: a rerun skips the ' +
    'records already in the output. A bad image becomes an error record.',
  positionals: [{ dest: 'input', metavar: 'INPUT', help: 'a folder (recursive), a glob like "data/**/*.jpg", or a JSONL/text list of image paths or URLs (optional "id", "prompt")' }],
  flags: [
    { name: 'output', aliases: ['o'], type: 'string', dest: 'output', metavar: 'OUT.jsonl', help: 'output JSONL (appended to; required)' },
    { name: 'endpoint', type: 'strings', dest: 'endpoint', metavar: 'URL', help: 'caption through these running OpenAI-compatible servers instead of loading a model (requests spread across them)' },
    { name: 'api-key', type: 'string', dest: 'apiKey', help: 'bearer token for --endpoint servers (default: $OPENAI_API_KEY)' },
    RETRIES_FLAG,
    { name: 'prompt', type: 'string', dest: 'prompt', help: `prompt for records without one (default: "${DEFAULT_CAPTION_PROMPT}")` },
    ...samplingFlags(CAPTION_DEFAULTS),
    { name: 'seed', type: 'int', dest: 'seed', help: 'run seed: each record samples with a seed derived from it and the record id (reproducible across reruns, shards and concurrency; default: random)' },
    { name: 'concurrency', type: 'int', dest: 'concurrency', help: 'requests in flight (default: --max-num-seqs in-process, 8 per endpoint)' },
    { name: 'shard', type: 'string', dest: 'shard', metavar: 'i/N', help: 'caption only shard i of N (0-based; split by a stable hash of the record id)' },
    { name: 'limit', type: 'int', dest: 'limit', help: 'caption at most this many new records in this run' },
    { name: 'retry-errors', type: 'bool', dest: 'retryErrors', help: 'remove error records from the output and try them again' },
    { name: 'image-root', type: 'string', dest: 'imageRoot', metavar: 'DIR', help: "folder that relative image paths of a list start from (default: the list's folder)" },
    { name: 'fsync', type: 'string', dest: 'fsync', choices: ['interval', 'always'], help: 'flush the output to disk every second (interval, default) or after every record (always)' },
    { name: 'progress', type: 'bool', dest: 'progress', help: 'progress on stderr: a bar on a terminal, a line every 10 s otherwise (default: on; --no-progress)' },
    ...engineFlags(),
  ],
};

export function summaryLine(label: string, out: string, r: CaptionJobResult): string {
  const parts = [
    `${label}: ${r.written} record${r.written === 1 ? '' : 's'} written to ${out} (${r.errors} error${r.errors === 1 ? '' : 's'}) ` +
    `in ${formatDuration(r.seconds)}, ${formatRate(r.rate, 'img')}`,
  ];
  if (r.alreadyDone) parts.push(`${r.alreadyDone} already done`);
  if (r.duplicates) parts.push(`${r.duplicates} duplicate id${r.duplicates === 1 ? '' : 's'} skipped`);
  if (r.tornBytes) parts.push(`cut a torn last line (${r.tornBytes} bytes)`);
  if (r.retried) parts.push(`${r.retried} error record${r.retried === 1 ? '' : 's'} retried`);
  if (r.stopped) parts.push('stopped early: rerun to resume');
  return `${parts.join('; ')}\n`;
}

export async function runCaptionCommand(argv: readonly string[]): Promise<number> {
  const v = parseArgsOrHelp(CAPTION_SPEC, argv);
  if (!v) return 0;
  const input = requireStr(v, 'input', 'an INPUT is required: caprl caption INPUT -o OUT.jsonl');
  const output = requireStr(v, 'output', 'an output file is required: -o OUT.jsonl');
  const endpoints = strings(v, 'endpoint');
  if (endpoints && (str(v, 'model') || str(v, 'mmproj'))) {
    throw new CliUsageError('give either --endpoint (servers) or --model/--mmproj (in this process), not both');
  }
  const settings = settingsFromFlags(v, CAPTION_DEFAULTS);
  const shard = shardFromFlags(v);
  const limit = int(v, 'limit');
  if (limit !== undefined && limit < 0) throw new CliUsageError(`argument --limit: must be non-negative, got ${limit}`);
  const concurrency = positiveInt(v, 'concurrency', 'concurrency');
  let source;
  try {
    source = await openInputSource(input, { imageRoot: str(v, 'imageRoot') });
  } catch (err) {
    if (err instanceof InputError) throw new CliUsageError(err.message);
    throw err;
  }

  let engine: Engine | undefined;
  let captioner: Captioner;
  if (endpoints) {
    const served = strings(v, 'servedModelName')?.[0];
    const pool = new EndpointPool(endpoints, endpointOptions(v));
    captioner = new EndpointCaptioner(pool, served ?? endpoints[0]!, served);
  } else {
    if (!str(v, 'model')) throw new CliUsageError('a model is required: --model MODEL.gguf --mmproj MMPROJ.gguf (or --endpoint URL)');
    const opened = await openEngineFromFlags(v);
    engine = opened.engine;
    try {
      const name = opened.cfg.servedModelNames[0];
      captioner = new EngineCaptioner(engine, !name || name === opened.cfg.model ? path.basename(opened.cfg.model) : name, {
        maxSeqs: opened.cfg.maxNumSeqs,
      });
    } catch (err) {
      await engine.close();
      throw new CliUsageError((err as Error).message);
    }
  }

  const log = (s: string): void => void process.stderr.write(`caprl caption: ${s}\n`);
  const signals = stopSignals(log);
  try {
    const r = await runCaptionJob({
      source,
      output,
      captioner,
      settings,
      prompt: str(v, 'prompt'),
      seed: int(v, 'seed'),
      shard,
      limit,
      concurrency,
      retryErrors: v.retryErrors === true,
      fsync: str(v, 'fsync') === 'always' ? 'always' : 'interval',
      progress: v.progress === false ? null : process.stderr,
      label: shard ? `caption ${shard.index}/${shard.count}` : 'caption',
      stop: signals.stop,
      abort: signals.abort,
    });
    process.stderr.write(summaryLine('caprl caption', output, r));
    return r.stopped ? 130 : 0;
  } catch (err) {
    if (err instanceof EndpointError) throw new CliFatalError(`${err.message} (the records written so far are kept: rerun to resume)`, { cause: err });
    throw err;
  } finally {
    signals.dispose();
    await engine?.close();
  }
}

// Flags and setup shared by `caprl caption`, `caprl run-batch` and `caprl eval`: the engine
// flags are `caprl serve`'s own (same names, same help, same checks, Hugging Face models too),
// sampling flags map to the chat request fields and are validated exactly as a request is.
import { setMaxListeners } from 'node:events';
import { Engine } from '../engine/engine.js';
import { CliFatalError, CliUsageError, int, str, type FlagSpec, type ParsedValue } from '../config/cli-args.js';
import { ApiError } from '../serving/errors.js';
import { SERVE_SPEC, engineOptionsFor, serveConfigFromArgs, type ServeConfig } from '../config/serve-config.js';
import { resolveServeModel } from '../hub/model-source.js';
import { samplingSettings, type SamplingSettings } from './caption.js';
import type { EndpointPoolOptions } from './endpoints.js';
import { parseShard, ShardSpecError, type Shard } from './shard.js';

/** `caprl serve` flags that choose and size the engine. */
const ENGINE_FLAG_NAMES = [
  'model', 'mmproj', 'revision', 'download-dir', 'dtype', 'quantization', 'max-model-len', 'kv-cache-tokens', 'kv-cache-memory-bytes', 'gpu-memory-utilization',
  'max-num-seqs', 'max-num-batched-tokens', 'threads', 'n-gpu-layers', 'chat-template', 'served-model-name',
];

export function engineFlags(): FlagSpec[] {
  const byName = new Map(SERVE_SPEC.flags.map((f) => [f.name, f]));
  return ENGINE_FLAG_NAMES.map((n) => byName.get(n)).filter((f): f is FlagSpec => f !== undefined);
}

export interface SamplingDefaults {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
}

/** Sampling flags -> request field names. */
const SAMPLING: { flag: FlagSpec; field: string }[] = [
  { flag: { name: 'max-tokens', type: 'int', dest: 'maxTokens', help: 'most tokens per caption' }, field: 'max_tokens' },
  { flag: { name: 'temperature', type: 'float', dest: 'temperature', help: 'sampling temperature (0 = greedy)' }, field: 'temperature' },
  { flag: { name: 'top-p', type: 'float', dest: 'topP', help: 'nucleus sampling' }, field: 'top_p' },
  { flag: { name: 'top-k', type: 'int', dest: 'topK', help: 'top-k sampling (default: off)' }, field: 'top_k' },
  { flag: { name: 'min-p', type: 'float', dest: 'minP', help: 'min-p sampling (default: 0)' }, field: 'min_p' },
  { flag: { name: 'repetition-penalty', type: 'float', dest: 'repetitionPenalty', help: 'repetition penalty (default: 1.0)' }, field: 'repetition_penalty' },
  { flag: { name: 'presence-penalty', type: 'float', dest: 'presencePenalty', help: 'presence penalty (default: 0)' }, field: 'presence_penalty' },
  { flag: { name: 'frequency-penalty', type: 'float', dest: 'frequencyPenalty', help: 'frequency penalty (default: 0)' }, field: 'frequency_penalty' },
];

export function samplingFlags(d: SamplingDefaults): FlagSpec[] {
  const shown: Record<string, number | undefined> = { maxTokens: d.maxTokens, temperature: d.temperature, topP: d.topP };
  return SAMPLING.map(({ flag }) => (shown[flag.dest] !== undefined ? { ...flag, help: `${flag.help} (default: ${shown[flag.dest]})` } : flag));
}

/** Sampling flags -> validated settings; a value the chat endpoint would refuse is a usage error naming the flag. */
export function settingsFromFlags(values: Record<string, ParsedValue>, d: SamplingDefaults): SamplingSettings {
  const fields: Record<string, unknown> = {
    max_tokens: d.maxTokens,
    temperature: d.temperature,
    top_p: d.topP,
  };
  for (const { flag, field } of SAMPLING) {
    if (values[flag.dest] !== undefined) fields[field] = values[flag.dest];
  }
  try {
    return samplingSettings(fields);
  } catch (err) {
    if (err instanceof ApiError) {
      const flag = SAMPLING.find((s) => s.field === err.param)?.flag.name;
      throw new CliUsageError(flag ? `argument --${flag}: ${err.message}` : err.message);
    }
    throw err;
  }
}

export const RETRIES_FLAG: FlagSpec = {
  name: 'retries', type: 'int', dest: 'retries',
  help: 'attempts after the first for a request a server could not answer (connection, timeout, 5xx), on the other servers when there are; then the run stops (default: 4)',
};

/** --api-key / $OPENAI_API_KEY and --retries for an EndpointPool. */
export function endpointOptions(values: Record<string, ParsedValue>): EndpointPoolOptions {
  const retries = int(values, 'retries');
  if (retries !== undefined && retries < 0) throw new CliUsageError(`argument --retries: must be non-negative, got ${retries}`);
  return { apiKey: str(values, 'apiKey') ?? process.env.OPENAI_API_KEY, retries };
}

export function shardFromFlags(values: Record<string, ParsedValue>): Shard | undefined {
  const s = str(values, 'shard');
  if (s === undefined) return undefined;
  try {
    return parseShard(s);
  } catch (err) {
    if (err instanceof ShardSpecError) throw new CliUsageError(err.message);
    throw err;
  }
}

/** A config whose --max-num-seqs is the engine's (the KV cache's count where the flag was not given). */
export type OpenedConfig = ServeConfig & { maxNumSeqs: number };

/** Opens the engine the flags describe (a Hugging Face MODEL is downloaded/converted first, as by serve). */
export async function openEngineFromFlags(values: Record<string, ParsedValue>): Promise<{ engine: Engine; cfg: OpenedConfig }> {
  const cfg = serveConfigFromArgs(await resolveServeModel(values));
  try {
    const engine = new Engine({ ...engineOptionsFor(cfg), logLevel: 'error' });
    return { engine, cfg: { ...cfg, maxNumSeqs: engine.info.maxSeqs } };
  } catch (err) {
    throw new CliFatalError(`could not load the model: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

/**
 * SIGINT/SIGTERM for a bulk run: the first stops taking new records (those in flight finish and
 * are written), the second cancels what is in flight. Returns the signals and a disposer.
 */
export function stopSignals(log: (s: string) => void): { stop: AbortSignal; abort: AbortSignal; dispose: () => void } {
  const stop = new AbortController();
  const abort = new AbortController();
  // Each request in flight links its own signal to these (pool.ts withLinkedSignal): as many
  // listeners as the concurrency, which is not a leak.
  setMaxListeners(0, stop.signal, abort.signal);
  const on = (sig: NodeJS.Signals): void => {
    if (!stop.signal.aborted) {
      log(`${sig}: finishing the records in flight, then stopping (again to cancel them); rerun to resume`);
      stop.abort();
    } else if (!abort.signal.aborted) {
      log(`${sig} again: cancelling the records in flight`);
      abort.abort();
    }
  };
  process.on('SIGINT', on);
  process.on('SIGTERM', on);
  return {
    stop: stop.signal,
    abort: abort.signal,
    dispose: () => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
    },
  };
}

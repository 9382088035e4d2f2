// What `caprl serve MODEL` accepts, resolved to the GGUF pair the engine opens:
//   - a GGUF file (with --mmproj for images): used as it is;
//   - a Hugging Face model folder (config.json + safetensors): converted to GGUF (cached);
//   - a Hub repo id (org/name, e.g. internlm/CapRL-3B): downloaded into the Hugging Face cache
//     (--revision, HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE or --download-dir,
//     HF_HUB_OFFLINE), then converted like a folder.
// Converted files live under $CAPRL_CACHE (default $XDG_CACHE_HOME/caprl-serve or
// ~/.cache/caprl-serve)/converted/.

import { existsSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { basename, join } from 'node:path';
import { convertHfFolder, ConvertOptionError, type ConvertResult } from '../convert/convert.js';
import { ModelFolderError } from '../convert/hf-folder.js';
import { CliFatalError, CliUsageError, type ParsedValue } from '../config/cli-args.js';
import { HubClient, HubError, hubOptionsFromEnv, isRepoId, type HubOptions } from './hub.js';
import { createProgress, type ProgressStream } from './progress.js';

export type ModelSourceKind = 'gguf' | 'folder' | 'hub';

export interface ResolveOptions {
  revision?: string;
  dtype?: string;
  quantization?: string;
  /** Hugging Face hub cache (overrides the environment's) */
  downloadDir?: string;
  env?: NodeJS.ProcessEnv;
  /** stderr: progress bars and notes */
  stderr?: ProgressStream;
}

export interface ResolvedModel {
  kind: ModelSourceKind;
  model: string;
  mmproj?: string;
  /** For a converted model: where the conversion result came from */
  conversion?: ConvertResult;
}

/** Where converted GGUFs are kept: $CAPRL_CACHE, else $XDG_CACHE_HOME/caprl-serve, else ~/.cache/caprl-serve. */
export function caprlCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.CAPRL_CACHE || join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'caprl-serve');
}

/** Which kind of MODEL this is, without touching the network. */
export function classifyModel(spec: string): ModelSourceKind | 'missing' {
  if (existsSync(spec)) return statSync(spec).isDirectory() ? 'folder' : 'gguf';
  if (isRepoId(spec) && !/\.gguf$/i.test(spec)) return 'hub';
  return 'missing';
}

/** Resolve MODEL to a GGUF pair, downloading and converting as needed. */
export async function resolveModel(spec: string, o: ResolveOptions = {}): Promise<ResolvedModel> {
  const kind = classifyModel(spec);
  const err = o.stderr;
  const note = (l: string) => err?.write(`${l}\n`);
  if (kind === 'missing') throw new CliUsageError(`model file not found: ${spec} (MODEL is a GGUF file, a Hugging Face model folder or a repo id like internlm/CapRL-3B)`);
  if (kind === 'gguf') {
    if (o.dtype !== undefined && o.dtype !== 'auto') note(`--dtype ${o.dtype} ignored: ${spec} is already a GGUF file`);
    if (o.quantization !== undefined) note(`--quantization ${o.quantization} ignored: ${spec} is already a GGUF file`);
    return { kind, model: spec };
  }
  const env = o.env ?? process.env;
  let dir = spec;
  let name = basename(spec.replace(/\/+$/, ''));
  if (kind === 'hub') {
    const hubOpts: HubOptions = { ...hubOptionsFromEnv(env), progress: err, log: note };
    if (o.downloadDir) hubOpts.cacheDir = o.downloadDir;
    const revision = o.revision ?? 'main';
    note(`${spec}: ${hubOpts.offline ? 'looking in' : 'fetching into'} the Hugging Face cache ${hubOpts.cacheDir} (revision ${revision}${hubOpts.offline ? ', offline' : ''})`);
    const snap = await new HubClient(hubOpts).snapshot(spec, revision);
    note(`${spec}: snapshot ${snap.commit}${snap.downloaded.length ? ` (downloaded ${snap.downloaded.length} files)` : ' (from the cache)'}`);
    dir = snap.dir;
    name = spec;
  } else if (o.revision !== undefined) {
    note(`--revision ${o.revision} ignored: ${spec} is a local folder`);
  }
  let bar: ReturnType<typeof createProgress> | undefined;
  const result = await convertHfFolder({
    dir,
    name,
    dtype: o.dtype,
    quantization: o.quantization,
    cacheDir: join(caprlCacheDir(env), 'converted'),
    log: note,
    onProgress: (done, total) => {
      bar ??= err ? createProgress(err, `converting ${name} to GGUF`, total) : undefined;
      bar?.update(done);
    },
  });
  bar?.finish();
  note(`${name}: ${result.cached ? 'using the converted' : 'converted to'} ${result.dtype} GGUF in ${result.outDir}`);
  return { kind, model: result.model, mmproj: result.mmproj, conversion: result };
}

function str(values: Record<string, ParsedValue>, key: string): string | undefined {
  const v = values[key];
  return typeof v === 'string' ? v : undefined;
}

/**
 * The `caprl serve` hook: parsed flags with MODEL (positional or --model) resolved to the GGUF
 * pair. The served model name defaults to MODEL as given (vLLM serves `internlm/CapRL-3B` as
 * "internlm/CapRL-3B"). Values are returned unchanged when there is no MODEL to resolve.
 */
export async function resolveServeModel(values: Record<string, ParsedValue>, stderr: ProgressStream = process.stderr): Promise<Record<string, ParsedValue>> {
  const tag = str(values, 'modelTag');
  const flag = str(values, 'model');
  if ((tag && flag && tag !== flag) || !(tag ?? flag)) return values; // serve's own checks report these
  const spec = (tag ?? flag)!;
  const kind = classifyModel(spec);
  if (kind !== 'gguf' && kind !== 'missing' && str(values, 'mmproj') !== undefined) {
    throw new CliUsageError(`--mmproj is for GGUF models only: the vision tower of ${spec} is converted with it`);
  }
  let r: ResolvedModel;
  try {
    r = await resolveModel(spec, {
      revision: str(values, 'revision'),
      dtype: str(values, 'dtype'),
      quantization: str(values, 'quantization'),
      downloadDir: str(values, 'downloadDir'),
      stderr,
    });
  } catch (e) {
    if (e instanceof ConvertOptionError) throw new CliUsageError(e.message);
    if (e instanceof HubError || e instanceof ModelFolderError) throw new CliFatalError(e.message, { cause: e });
    throw e;
  }
  if (r.kind === 'gguf') return values;
  const out: Record<string, ParsedValue> = { ...values, model: r.model, mmproj: r.mmproj! };
  delete out.modelTag;
  if (out.servedModelName === undefined) out.servedModelName = [spec];
  return out;
}

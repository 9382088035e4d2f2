// Random-weight model generation: the two GGUF files of a preset, and the
// `caprl generate-model` subcommand.

import { mkdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { GGUFWriter } from './gguf-writer.js';
import { getPreset, PRESET_NAMES, type PresetName } from './presets.js';
import { MODEL_DTYPES, planModel, type ModelDType, type PlannedTensor } from './qwen25vl.js';
import { ChunkBuffers, tensorChunks } from './weights.js';
import { tensorByteSize, type GGUFMetadata } from './gguf.js';

export interface GenerateOptions {
  preset: PresetName;
  dtype: ModelDType;
  seed: number;
  outDir: string;
  /** Called after each tensor with bytes written so far and the total of both files. */
  onProgress?: (done: number, total: number) => void;
}

/** File names a generation writes, relative to outDir. */
export function modelFileNames(preset: PresetName, dtype: ModelDType): { model: string; mmproj: string } {
  return { model: `${preset}-${dtype}.gguf`, mmproj: `mmproj-${preset}-${dtype}.gguf` };
}

async function writeFile(
  path: string,
  metadata: GGUFMetadata,
  tensors: PlannedTensor[],
  seed: number,
  bufs: ChunkBuffers,
  progress: (bytes: number) => void,
): Promise<void> {
  const w = await GGUFWriter.create(path, metadata, tensors);
  try {
    progress(w.dataOffset);
    for (const [i, t] of tensors.entries()) {
      await w.writeTensor(t.name, tensorChunks(t, seed, bufs));
      progress(w.placements[i].byteSize);
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  }
}

/**
 * Write `<outDir>/<preset>-<dtype>.gguf` (text model) and `<outDir>/mmproj-<preset>-<dtype>.gguf`
 * (vision encoder + projector). Same options ⇒ byte-identical files. Files are written under a
 * temporary name and renamed when complete. Returns the absolute paths.
 */
export async function generateModel(opts: GenerateOptions): Promise<{ model: string; mmproj: string }> {
  const preset = getPreset(opts.preset);
  if (!MODEL_DTYPES.includes(opts.dtype)) throw new Error(`unknown dtype "${opts.dtype}" (expected one of: ${MODEL_DTYPES.join(', ')})`);
  if (!Number.isSafeInteger(opts.seed) || opts.seed < 0) throw new Error(`seed must be a non-negative integer, got ${opts.seed}`);
  const outDir = resolve(opts.outDir);
  await mkdir(outDir, { recursive: true });
  const names = modelFileNames(opts.preset, opts.dtype);
  const model = join(outDir, names.model);
  const mmproj = join(outDir, names.mmproj);

  const plan = planModel(preset, opts.dtype, opts.seed);
  const bufs = new ChunkBuffers();
  let done = 0;
  const total = [plan.text.tensors, plan.vision.tensors].flat().reduce((s, t) => s + tensorByteSize(t.shape, t.type), 0);
  const progress = (bytes: number) => {
    done += bytes;
    opts.onProgress?.(done, total);
  };
  await writeFile(model, plan.text.metadata, plan.text.tensors, opts.seed, bufs, progress);
  await writeFile(mmproj, plan.vision.metadata, plan.vision.tensors, opts.seed, bufs, progress);
  return { model, mmproj };
}

const USAGE = `usage: caprl generate-model [--preset tiny|caprl-3b] [--dtype f16|bf16|q8_0] [--seed N] [--out DIR]

Writes a random-weight Qwen2.5-VL-shaped model as two GGUF files:
  DIR/<preset>-<dtype>.gguf          text model (llama.cpp arch qwen2vl, tokenizer, chat template)
  DIR/mmproj-<preset>-<dtype>.gguf   vision encoder + projector (clip, qwen2.5vl_merger)

  --preset   tiny (a few MB, for tests) or caprl-3b (CapRL-3B's real shape, ~7.5 GB in f16); default tiny
  --dtype    f16, bf16 or q8_0; default f16
  --seed     non-negative integer; same seed => byte-identical files; default 0
  --out      output directory (created if missing); default ./models
`;

/** Where runGenerateModel writes (process streams by default; tests pass their own). */
export interface CliIO {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown; isTTY?: boolean };
}

/** `caprl generate-model ARGS`: returns the process exit code (0 ok, 2 usage error, 1 failure). */
export async function runGenerateModel(argv: string[], io: CliIO = process): Promise<number> {
  let preset: string = 'tiny';
  let dtype: string = 'f16';
  let seedStr = '0';
  let out = 'models';
  const err = (m: string): number => {
    io.stderr.write(`caprl generate-model: ${m}\n\n${USAGE}`);
    return 2;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      io.stdout.write(USAGE);
      return 0;
    }
    const m = /^(--[a-z-]+)(?:=(.*))?$/s.exec(arg);
    if (!m) return err(`unexpected argument "${arg}"`);
    const flag = m[1];
    if (!['--preset', '--dtype', '--seed', '--out'].includes(flag)) return err(`unknown flag ${flag}`);
    let value = m[2];
    if (value === undefined) {
      if (i + 1 >= argv.length || argv[i + 1].startsWith('--')) return err(`${flag} needs a value`);
      value = argv[++i];
    }
    if (flag === '--preset') preset = value;
    else if (flag === '--dtype') dtype = value;
    else if (flag === '--seed') seedStr = value;
    else out = value;
  }
  if (!(PRESET_NAMES as readonly string[]).includes(preset)) return err(`bad value for --preset: "${preset}" (expected ${PRESET_NAMES.join(' or ')})`);
  if (!(MODEL_DTYPES as readonly string[]).includes(dtype)) return err(`bad value for --dtype: "${dtype}" (expected ${MODEL_DTYPES.join(', ')})`);
  if (!/^\d+$/.test(seedStr) || !Number.isSafeInteger(Number(seedStr))) return err(`bad value for --seed: "${seedStr}" (expected a non-negative integer)`);
  if (!out) return err('bad value for --out: empty path');

  const t0 = Date.now();
  let lastPct = -1;
  const tty = io.stderr.isTTY === true;
  try {
    const res = await generateModel({
      preset: preset as PresetName,
      dtype: dtype as ModelDType,
      seed: Number(seedStr),
      outDir: out,
      onProgress: (done, total) => {
        const pct = Math.floor((100 * done) / total);
        // On a terminal: every percent, in place; otherwise one line per 10%.
        const step = tty ? pct : Math.floor(pct / 10) * 10;
        if (step !== lastPct) {
          lastPct = step;
          io.stderr.write(tty ? `\rgenerating ${preset} ${dtype}: ${step}%` : `generating ${preset} ${dtype}: ${step}%\n`);
        }
      },
    });
    if (tty) io.stderr.write('\n');
    const [a, b] = await Promise.all([stat(res.model), stat(res.mmproj)]);
    const secs = ((Date.now() - t0) / 1000).toFixed(1);
    io.stdout.write(`model:  ${res.model} (${fmtBytes(a.size)})\nmmproj: ${res.mmproj} (${fmtBytes(b.size)})\ngenerated in ${secs}s\n`);
    return 0;
  } catch (e) {
    if (tty) io.stderr.write('\n');
    io.stderr.write(`caprl generate-model: ${(e as Error).message}\n`);
    return 1;
  }
}

function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e3).toFixed(1)} kB`;
}

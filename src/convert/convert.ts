// Hugging Face Qwen2.5-VL folder -> text GGUF + mmproj GGUF, in TypeScript, streamed tensor by
// tensor: each GGUF tensor is cut out of its safetensors tensor by offset, chunk by chunk,
// converted (dtype or Q8_0) and written, so memory stays flat whatever the model's size.
//
// The output files are the ones src/model/qwen25vl.ts plans for the generator: the same tensor
// list, types and arch metadata (planTextTensors / planVisionTensors / textArchMetadata /
// visionArchMetadata on the shape read from config.json), with the tokenizer and chat template
// of the folder. They are cached by content under the cache dir: a second start with the same
// weights and options reuses them.

import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rename, writeFile, type FileHandle } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { GGMLType, GGUFMetadata, tensorByteSize } from '../model/gguf.js';
import { GGUFWriter } from '../model/gguf-writer.js';
import {
  generalMetadata, planTextTensors, planVisionTensors, textArchMetadata, visionArchMetadata,
  type ModelDType, type PlannedTensor,
} from '../model/qwen25vl.js';
import { addTokenizerMetadata } from '../model/tokenizer.js';
import { convertElements, ConvertScratch, dtypeBytes } from './dtype.js';
import { readHfFolder, ModelFolderError, type HfFolder, type HfTensorRef } from './hf-folder.js';
import { canonicalHfName, hfSourceOf, hfTensorsFromPlan, isIgnoredHfTensor, mapHfTensor, type Extract } from './qwen25vl-hf.js';
import { FLOAT_DTYPES, type FloatDType } from './safetensors.js';

/** Bumped whenever converted bytes for the same input and options change (invalidates caches). */
export const CONVERTER_VERSION = 1;

export const CONVERT_DTYPES = ['auto', 'bf16', 'f16'] as const;
export type ConvertDType = (typeof CONVERT_DTYPES)[number];
export const CONVERT_QUANTIZATIONS = ['q8_0'] as const;
/** Quantizations users ask for that need llama.cpp's quantizer (k-quants): not done in TypeScript. */
export const NATIVE_ONLY_QUANTIZATIONS = ['q4_k_m', 'q4_k_s', 'q5_k_m', 'q5_k_s', 'q6_k', 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q3_k_m', 'q2_k'];

export class ConvertOptionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConvertOptionError';
  }
}

export interface ConvertOptions {
  /** The Hugging Face model folder */
  dir: string;
  /** Weight type of the GGUFs; auto: bf16 for bf16 weights, f16 otherwise (as vLLM's --dtype auto). Default auto. */
  dtype?: string;
  /** 'q8_0' quantizes the weight matrices; undefined keeps --dtype. */
  quantization?: string;
  /** Converted files live under this folder, one subfolder per (content, options). */
  cacheDir: string;
  /** general.name (a repo id, or the folder's name by default) */
  name?: string;
  /** Called after each chunk with output bytes written so far and the total. */
  onProgress?: (done: number, total: number) => void;
  /** Progress and notes, one line each. */
  log?: (line: string) => void;
}

export interface ConvertResult {
  model: string;
  mmproj: string;
  dtype: ModelDType;
  /** true: found in the cache, nothing was converted */
  cached: boolean;
  outDir: string;
}

/** Output type for a folder and the user's --dtype / --quantization. */
export function outputDType(folder: HfFolder, dtype: string = 'auto', quantization?: string): ModelDType {
  const dt = { bfloat16: 'bf16', float16: 'f16', half: 'f16' }[dtype] ?? dtype;
  if (!(CONVERT_DTYPES as readonly string[]).includes(dt)) {
    throw new ConvertOptionError(`--dtype ${dtype} is not supported (choose auto, bfloat16/bf16 or float16/f16)`);
  }
  if (quantization !== undefined) {
    const q = quantization.toLowerCase();
    if (q === 'q8_0') return 'q8_0';
    if (NATIVE_ONLY_QUANTIZATIONS.includes(q)) {
      throw new ConvertOptionError(`--quantization ${quantization} is not supported yet: it needs llama.cpp's quantizer in the native addon; use q8_0, or quantize a GGUF with llama-quantize and serve that`);
    }
    throw new ConvertOptionError(`--quantization ${quantization} is not supported (caprl-serve converts to q8_0; vLLM's awq/gptq/fp8 checkpoints are not GGUF-convertible here)`);
  }
  if (dt !== 'auto') return dt as ModelDType;
  // auto: the dtype of the weight matrices (what config.json's torch_dtype says, but measured).
  let bf16 = 0;
  let other = 0;
  for (const t of folder.tensors.values()) if (t.shape.length >= 2) t.dtype === 'BF16' ? bf16++ : other++;
  return bf16 >= other ? 'bf16' : 'f16';
}

interface Source {
  ref: HfTensorRef;
  extract: Extract;
}

/**
 * Where each planned GGUF tensor comes from. Checks, in the checkpoint's own terms, that every
 * tensor config.json implies is there with the right shape and a float dtype, and that nothing
 * is left over.
 */
export function planSources(folder: HfFolder, planned: readonly PlannedTensor[], log: (l: string) => void = () => {}): Map<string, Source> {
  const byName = new Map<string, HfTensorRef>();
  for (const ref of folder.tensors.values()) {
    if (isIgnoredHfTensor(ref.name)) continue;
    const c = canonicalHfName(ref.name);
    const prev = byName.get(c);
    if (prev) throw new ModelFolderError(`${ref.file} has ${ref.name} and ${prev.file} has ${prev.name}: the same weight twice`);
    byName.set(c, ref);
  }
  const present = new Map(byName);
  const where = `in ${folder.dir}`;
  for (const e of hfTensorsFromPlan(planned)) {
    const ref = present.get(e.name);
    if (!ref) {
      throw new ModelFolderError(`tensor ${e.name} is missing: no safetensors file ${where} has it, but config.json's model needs it (shape [${e.shape.join(', ')}])`);
    }
    if (ref.shape.join() !== e.shape.join()) {
      throw new ModelFolderError(`${ref.file}: tensor ${ref.name} has shape [${ref.shape.join(', ')}], but config.json's model needs [${e.shape.join(', ')}] (${where})`);
    }
    if (!(ref.dtype in FLOAT_DTYPES)) {
      throw new ModelFolderError(`${ref.file}: tensor ${ref.name} is ${ref.dtype}; only F32, F16 and BF16 weights can be converted (${where})`);
    }
    present.delete(e.name);
  }
  for (const [c, ref] of present) {
    if (c === 'lm_head.weight' && folder.shape.text.tiedEmbeddings) {
      log(`${ref.file}: ${ref.name} ignored (tie_word_embeddings: the output layer is the token embedding)`);
      continue;
    }
    throw new ModelFolderError(`${ref.file}: tensor ${ref.name} has no place in the model config.json describes (${where})`);
  }
  const sources = new Map<string, Source>();
  for (const t of planned) {
    const src = hfSourceOf(t.name)!;
    const ref = byName.get(src.hf)!;
    const part = mapHfTensor(ref.name, ref.shape)?.[src.part];
    if (!part || part.gguf !== t.name || part.shape.join() !== t.shape.join()) {
      throw new Error(`internal: ${ref.name} does not map back to ${t.name} [${t.shape.join(', ')}]`);
    }
    sources.set(t.name, { ref, extract: part.extract });
  }
  return sources;
}

/** Elements per chunk: a multiple of 32 (Q8_0 blocks). */
const CHUNK = 1 << 21;

class ChunkBuffers {
  readonly read = [new Uint8Array(CHUNK * 4), new Uint8Array(CHUNK * 4)];
  readonly gather = new Uint8Array(CHUNK * 4);
  readonly out = [new Uint8Array(CHUNK * 4), new Uint8Array(CHUNK * 4)];
  readonly scratch = new ConvertScratch(CHUNK);
  which = 0;
}

async function readExactly(fh: FileHandle, buf: Uint8Array, len: number, pos: number, what: string): Promise<void> {
  let off = 0;
  while (off < len) {
    const { bytesRead } = await fh.read(buf, off, len - off, pos + off);
    if (bytesRead === 0) throw new ModelFolderError(`${what}: unexpected end of file at byte ${pos + off} (truncated?)`);
    off += bytesRead;
  }
}

/** The encoded bytes of planned tensor `t`, chunk by chunk, alternating buffers (see ChunkSource). */
async function* tensorChunks(fh: FileHandle, t: PlannedTensor, src: Source, bufs: ChunkBuffers): AsyncGenerator<Uint8Array> {
  const from = src.ref.dtype as FloatDType;
  const esz = dtypeBytes(from);
  const { first, blocks, stride, len } = src.extract;
  const base = src.ref.start + first * esz;
  const what = `${src.ref.file} (${src.ref.name})`;
  if (blocks === 1) {
    for (let off = 0; off < len; off += CHUNK) {
      const n = Math.min(CHUNK, len - off);
      const w = (bufs.which ^= 1);
      await readExactly(fh, bufs.read[w], n * esz, base + off * esz, what);
      yield convertElements(bufs.read[w], from, n, t.type, bufs.scratch, bufs.out[w]);
    }
    return;
  }
  if (len > CHUNK) throw new Error(`internal: strided blocks of ${len} elements`);
  const perGroup = Math.floor((CHUNK - len) / stride) + 1;
  for (let b = 0; b < blocks; b += perGroup) {
    const g = Math.min(perGroup, blocks - b);
    const w = (bufs.which ^= 1);
    const span = ((g - 1) * stride + len) * esz;
    await readExactly(fh, bufs.read[w], span, base + b * stride * esz, what);
    for (let i = 0; i < g; i++) bufs.gather.set(bufs.read[w].subarray(i * stride * esz, (i * stride + len) * esz), i * len * esz);
    if (t.type === GGMLType.Q8_0 && (g * len) % 32) throw new Error(`internal: ${t.name}: strided Q8_0 chunk`);
    yield convertElements(bufs.gather, from, g * len, t.type, bufs.scratch, bufs.out[w]);
  }
}

async function writeGGUF(path: string, meta: GGUFMetadata, planned: PlannedTensor[], sources: Map<string, Source>, folder: HfFolder, bufs: ChunkBuffers, progress: (n: number) => void): Promise<void> {
  const handles = new Map<string, FileHandle>();
  const w = await GGUFWriter.create(path, meta, planned);
  try {
    for (const t of planned) {
      const src = sources.get(t.name)!;
      let fh = handles.get(src.ref.path);
      if (!fh) handles.set(src.ref.path, (fh = await open(src.ref.path, 'r')));
      await w.writeTensor(t.name, (async function* () {
        for await (const c of tensorChunks(fh!, t, src, bufs)) {
          yield c;
          progress(c.length);
        }
      })());
    }
    await w.finish();
  } catch (e) {
    await w.abort();
    throw e;
  } finally {
    for (const fh of handles.values()) await fh.close().catch(() => {});
  }
}

function slug(name: string): string {
  return name.replace(/\//g, '--').replace(/[^\w.-]+/g, '_').slice(0, 80) || 'model';
}

/** Convert (or find in the cache) the GGUF pair of a Hugging Face Qwen2.5-VL folder. */
export async function convertHfFolder(opts: ConvertOptions): Promise<ConvertResult> {
  const log = opts.log ?? (() => {});
  const dir = resolve(opts.dir);
  const folder = await readHfFolder(dir);
  const dtype = outputDType(folder, opts.dtype, opts.quantization);
  const name = opts.name ?? basename(dir);
  const text = planTextTensors(folder.shape, dtype);
  const vision = planVisionTensors(folder.shape, dtype);
  const sources = planSources(folder, [...text, ...vision], log);

  const key = createHash('sha256').update(`caprl-convert ${CONVERTER_VERSION} ${dtype}\0${folder.contentHash}`).digest('hex');
  const outDir = join(resolve(opts.cacheDir), `${slug(name)}-${key.slice(0, 16)}`);
  const model = join(outDir, `model-${dtype}.gguf`);
  const mmproj = join(outDir, `mmproj-${dtype}.gguf`);
  const manifestPath = join(outDir, 'manifest.json');
  if (existsSync(manifestPath) && existsSync(model) && existsSync(mmproj)) {
    try {
      if (JSON.parse(await readFile(manifestPath, 'utf8')).key === key) return { model, mmproj, dtype, cached: true, outDir };
    } catch {
      // unreadable manifest: convert again
    }
  }

  await mkdir(outDir, { recursive: true });
  const description = (what: string) => `${what} of ${name}, converted from Hugging Face safetensors by caprl-serve`;
  const textMeta = generalMetadata(new GGUFMetadata(), 'qwen2vl', { name, description: description('Text model'), dtype });
  textMeta.u32('caprl.converter.version', CONVERTER_VERSION);
  textArchMetadata(textMeta, folder.shape.text);
  addTokenizerMetadata(textMeta, folder.vocab, folder.chatTemplate);
  const visionMeta = generalMetadata(new GGUFMetadata(), 'clip', { name, description: description('Vision encoder and projector'), dtype });
  visionMeta.u32('caprl.converter.version', CONVERTER_VERSION);
  visionArchMetadata(visionMeta, folder.shape.vision);
  if (folder.chatTemplateSource === 'built-in') log('the folder has no chat template: using Qwen2.5-VL\'s');

  const total = [...text, ...vision].reduce((s, t) => s + tensorByteSize(t.shape, t.type), 0);
  let done = 0;
  const progress = (n: number) => {
    done += n;
    opts.onProgress?.(Math.min(done, total), total);
  };
  const bufs = new ChunkBuffers();
  await writeGGUF(model, textMeta, text, sources, folder, bufs, progress);
  await writeGGUF(mmproj, visionMeta, vision, sources, folder, bufs, progress);
  const manifest = { key, converterVersion: CONVERTER_VERSION, dtype, source: dir, name, model: basename(model), mmproj: basename(mmproj), created: new Date().toISOString() };
  await writeFile(`${manifestPath}.tmp-${process.pid}`, JSON.stringify(manifest, null, 2));
  await rename(`${manifestPath}.tmp-${process.pid}`, manifestPath);
  return { model, mmproj, dtype, cached: false, outDir };
}

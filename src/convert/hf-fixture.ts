// Writes a Hugging Face-format Qwen2.5-VL model folder (safetensors + config.json, tokenizer
// files, preprocessor config, chat template) holding the SAME random weights as the GGUF files
// `generateModel` writes for a shape and seed: every HF tensor is assembled from the planned GGUF
// tensors' own PRNG streams (src/model/weights.ts), fused qkv by row concatenation and the Conv3D
// patch embedding by interleaving the two temporal kernels. Converting the folder back must
// give the generated files' tensors: with tensorDtype 'exact' (each tensor stored in its GGUF
// type) byte for byte. Used by the tests (tiny) and the conversion benchmark (caprl-3b shape).

import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { GGMLType } from '../model/gguf.js';
import type { ModelShape } from '../model/presets.js';
import { planTextTensors, planVisionTensors, type PlannedTensor } from '../model/qwen25vl.js';
import { buildVocab } from '../model/tokenizer.js';
import { QWEN2_VL_CHAT_TEMPLATE } from '../model/chat-template.js';
import { ChunkBuffers, tensorChunks } from '../model/weights.js';
import { hfConfigFromShape, hfPreprocessorFromShape } from './hf-config.js';
import { tokenizerConfigJson, tokenizerJsonFromVocab } from './hf-tokenizer.js';
import { hfTensorsFromPlan, type HfTensorFromPlan } from './qwen25vl-hf.js';
import { createSafetensors, FLOAT_DTYPES, type FloatDType } from './safetensors.js';

type Json = Record<string, unknown>;

export interface HfFixtureOptions {
  shape: ModelShape;
  seed: number;
  outDir: string;
  /** Which generated GGUF's values: the planned tensors of this dtype. Default f16. */
  dtype?: 'f16' | 'bf16';
  /** 'exact': each tensor in its planned GGUF type (F32 norms/biases); else one dtype for all, as real checkpoints. Default 'exact'. */
  tensorDtype?: 'exact' | FloatDType;
  /** Number of safetensors files (>1: model-0000i-of-0000n.safetensors + index). Default 1. */
  shards?: number;
  /** A tokenizer.json to ship instead of the generated vocabulary's (its ids must fit vocabSize). */
  tokenizerJson?: Json;
  /** Where the chat template goes. Default tokenizer_config.json (and chat_template.json). */
  chatTemplateIn?: 'tokenizer_config' | 'jinja' | 'json';
  /** Save with transformers >= 4.52 names (model.language_model.*, model.visual.*). */
  newNames?: boolean;
  onProgress?: (done: number, total: number) => void;
}

const TYPE_DTYPE: Partial<Record<GGMLType, FloatDType>> = { [GGMLType.F32]: 'F32', [GGMLType.F16]: 'F16', [GGMLType.BF16]: 'BF16' };

function hfDtypeOf(e: HfTensorFromPlan, opt: 'exact' | FloatDType): FloatDType {
  if (opt !== 'exact') return opt;
  const d = TYPE_DTYPE[e.parts[0].type];
  if (!d) throw new Error(`${e.name}: planned type ${e.parts[0].type} has no safetensors dtype`);
  return d;
}

/** Bytes of one HF tensor, assembled from its planned parts' generated chunks. */
async function* hfTensorBytes(e: HfTensorFromPlan, dtype: FloatDType, seed: number, bufs: ChunkBuffers): AsyncGenerator<Uint8Array> {
  const parts = e.parts.map((p): PlannedTensor => ({ ...p, type: FLOAT_DTYPES[dtype] }));
  if (e.split !== 'temporal') {
    for (const p of parts) {
      // Chunks alternate between two buffers per tensor; copy when another part follows, so a
      // chunk still being written is never overwritten by the next part's first chunk.
      for (const c of tensorChunks(p, seed, bufs)) yield parts.length > 1 ? Uint8Array.from(c) : c;
    }
    return;
  }
  // [kw, kh, ch, C] kernels t = 0, 1 -> [C, ch, kt, kh, kw]
  const kernels = parts.map((p) => Buffer.concat([...tensorChunks(p, seed, bufs)].map((c) => Uint8Array.from(c))));
  const [kw, kh, ch, C] = parts[0].shape;
  const plane = kw * kh * (dtype === 'F32' ? 4 : 2);
  const out = Buffer.alloc(plane * kernels.length * ch * C);
  let o = 0;
  for (let b = 0; b < C * ch; b++) {
    for (const k of kernels) {
      k.copy(out, o, b * plane, (b + 1) * plane);
      o += plane;
    }
  }
  yield out;
}

/** Write the folder; returns its path. */
export async function writeHfFolder(opts: HfFixtureOptions): Promise<string> {
  const { shape, seed, outDir } = opts;
  const dtype = opts.dtype ?? 'f16';
  const tensorDtype = opts.tensorDtype ?? 'exact';
  await mkdir(outDir, { recursive: true });
  const planned = [...planTextTensors(shape, dtype), ...planVisionTensors(shape, dtype)];
  const tensors = hfTensorsFromPlan(planned);
  const rename = (n: string) => (opts.newNames ? n.replace(/^model\./, 'model.language_model.').replace(/^visual\./, 'model.visual.') : n);

  // Tokenizer and configs.
  const tok = opts.tokenizerJson ?? tokenizerJsonFromVocab(buildVocab({ vocabSize: shape.text.vocabSize, nBpe: shape.text.nBpe }));
  const idOf = (content: string): number => {
    const a = (tok.added_tokens as Json[]).find((x) => x.content === content);
    if (!a) throw new Error(`tokenizer.json has no ${content}`);
    return a.id as number;
  };
  const ids = {
    bosId: idOf('<|endoftext|>'),
    eosId: idOf('<|im_end|>'),
    vision: { start: idOf('<|vision_start|>'), end: idOf('<|vision_end|>'), pad: idOf('<|vision_pad|>'), image: idOf('<|image_pad|>'), video: idOf('<|video_pad|>') },
  };
  const torchDtype = ({ F32: 'float32', F16: 'float16', BF16: 'bfloat16' } as const)[tensorDtype === 'exact' ? (dtype === 'f16' ? 'F16' : 'BF16') : tensorDtype];
  const json = (f: string, v: unknown) => writeFile(join(outDir, f), `${JSON.stringify(v, null, 2)}\n`);
  await json('config.json', hfConfigFromShape(shape, ids, torchDtype));
  await json('generation_config.json', { bos_token_id: ids.bosId, pad_token_id: ids.bosId, do_sample: true, eos_token_id: [ids.eosId, ids.bosId], repetition_penalty: 1.05, temperature: 0.1, top_k: 1, top_p: 0.001 });
  await json('preprocessor_config.json', hfPreprocessorFromShape(shape));
  await json('tokenizer.json', tok);
  const where = opts.chatTemplateIn ?? 'tokenizer_config';
  const tc = tokenizerConfigJson(QWEN2_VL_CHAT_TEMPLATE);
  if (where !== 'tokenizer_config') delete tc.chat_template;
  await json('tokenizer_config.json', tc);
  if (where === 'jinja') await writeFile(join(outDir, 'chat_template.jinja'), QWEN2_VL_CHAT_TEMPLATE);
  else await json('chat_template.json', { chat_template: QWEN2_VL_CHAT_TEMPLATE });

  // Weights, in `shards` files of about equal size.
  const dtypes = tensors.map((e) => hfDtypeOf(e, tensorDtype));
  const sizes = tensors.map((e, i) => e.shape.reduce((a, d) => a * d, 1) * (dtypes[i] === 'F32' ? 4 : 2));
  const total = sizes.reduce((a, b) => a + b, 0);
  const shards = Math.max(1, Math.min(opts.shards ?? 1, tensors.length));
  const fileOf: number[] = [];
  let acc = 0;
  for (const s of sizes) {
    fileOf.push(Math.min(shards - 1, Math.floor((acc * shards) / total)));
    acc += s;
  }
  const fileName = (k: number) => (shards === 1 ? 'model.safetensors' : `model-${String(k + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`);
  const weightMap: Record<string, string> = {};
  const bufs = new ChunkBuffers();
  let done = 0;
  for (let k = 0; k < shards; k++) {
    const idx = tensors.map((_, i) => i).filter((i) => fileOf[i] === k);
    const w = await createSafetensors(join(outDir, fileName(k)), idx.map((i) => ({ name: rename(tensors[i].name), dtype: dtypes[i], shape: tensors[i].shape })), { format: 'pt' });
    try {
      for (const i of idx) {
        weightMap[rename(tensors[i].name)] = fileName(k);
        await w.writeTensor(rename(tensors[i].name), hfTensorBytes(tensors[i], dtypes[i], seed, bufs));
        done += sizes[i];
        opts.onProgress?.(done, total);
      }
      await w.finish();
    } catch (e) {
      await w.abort();
      throw e;
    }
  }
  if (shards > 1) await json('model.safetensors.index.json', { metadata: { total_size: total }, weight_map: weightMap });
  return outDir;
}

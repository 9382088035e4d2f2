// Hugging Face Qwen2.5-VL config.json + preprocessor_config.json <-> the ModelShape the GGUF
// plans are made from (src/model/presets.ts). Reading follows llama.cpp's converter
// (conversion/base.py TextModel / MmprojModel, conversion/qwenvl.py): text keys at the root or
// under text_config (newer transformers), vision keys under vision_config, rope_scaling or
// rope_parameters for mrope_section, image_mean/std from the preprocessor config.

import { validatePreset, type ModelShape } from '../model/presets.js';

/** The architectures this converter knows (config.json `architectures[0]`). */
export const SUPPORTED_ARCHITECTURES = ['Qwen2_5_VLForConditionalGeneration'] as const;

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

type Json = Record<string, unknown>;

function num(obj: Json, keys: readonly string[], where: string): number {
  for (const k of keys) {
    const v = obj[k];
    if (typeof v === 'number' && Number.isFinite(v)) return v;
    if (v !== undefined && v !== null) throw new ConfigError(`${where}.${k} must be a number, got ${JSON.stringify(v)}`);
  }
  throw new ConfigError(`${where} has no ${keys.join(' / ')}`);
}

function optNum(obj: Json, key: string, def: number, where: string): number {
  return obj[key] === undefined || obj[key] === null ? def : num(obj, [key], where);
}

function numArray(v: unknown, what: string, len?: number): number[] {
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'number' && Number.isFinite(x)) || (len !== undefined && v.length !== len)) {
    throw new ConfigError(`${what} must be ${len ? `${len} numbers` : 'a list of numbers'}, got ${JSON.stringify(v)}`);
  }
  return v as number[];
}

/** Text keys at the root (transformers < 4.53) or under text_config (newer): merged as the converter does. */
export function textHparams(config: Json): Json {
  const tc = config.text_config;
  return tc && typeof tc === 'object' ? { ...config, ...(tc as Json) } : config;
}

/** Checks architectures / model_type: Qwen2.5-VL only, with a message that says what was found. */
export function checkArchitecture(config: Json): void {
  const archs = config.architectures;
  const arch = Array.isArray(archs) && typeof archs[0] === 'string' ? archs[0] : undefined;
  const modelType = typeof config.model_type === 'string' ? config.model_type : undefined;
  const ok = arch ? (SUPPORTED_ARCHITECTURES as readonly string[]).includes(arch) : modelType === 'qwen2_5_vl';
  if (!ok || (modelType !== undefined && modelType !== 'qwen2_5_vl')) {
    throw new ConfigError(
      `config.json describes ${arch ?? '(no architectures)'} (model_type ${JSON.stringify(modelType ?? null)}); ` +
      `caprl-serve converts Qwen2.5-VL checkpoints (${SUPPORTED_ARCHITECTURES.join(', ')}, model_type "qwen2_5_vl"), as CapRL-3B is`,
    );
  }
}

/**
 * The model's shape from config.json and preprocessor_config.json. `nBpe` (first added-token id)
 * comes from the tokenizer; the tensor plans do not depend on it.
 */
export function shapeFromHfConfig(config: Json, preprocessor: Json, nBpe: number): ModelShape {
  checkArchitecture(config);
  const h = textHparams(config);
  const vc = config.vision_config;
  if (!vc || typeof vc !== 'object') throw new ConfigError('config.json has no vision_config');
  const v = vc as Json;
  const rope = (h.rope_scaling ?? h.rope_parameters ?? {}) as Json;
  const mrope = numArray(rope.mrope_section, 'config.json rope_scaling.mrope_section');
  if (mrope.length > 4) throw new ConfigError(`config.json rope_scaling.mrope_section has ${mrope.length} entries (at most 4)`);
  const ropeTheta = h.rope_theta ?? rope.rope_theta;
  if (typeof ropeTheta !== 'number') throw new ConfigError('config.json has no rope_theta');
  const fullatt = numArray(v.fullatt_block_indexes, 'config.json vision_config.fullatt_block_indexes');
  const tied = h.tie_word_embeddings;
  if (tied !== undefined && typeof tied !== 'boolean') throw new ConfigError(`config.json tie_word_embeddings must be true or false`);
  const mean = numArray(preprocessor.image_mean, 'preprocessor_config.json image_mean', 3);
  const std = numArray(preprocessor.image_std, 'preprocessor_config.json image_std', 3);
  const size = (preprocessor.size ?? {}) as Json;
  const C = 'config.json';
  const V = 'config.json vision_config';
  const shape: ModelShape = {
    text: {
      nEmbd: num(h, ['hidden_size'], C),
      nLayer: num(h, ['num_hidden_layers'], C),
      nHead: num(h, ['num_attention_heads'], C),
      nHeadKv: num(h, ['num_key_value_heads'], C),
      nFf: num(h, ['intermediate_size'], C),
      vocabSize: num(h, ['vocab_size'], C),
      nBpe,
      contextLength: num(h, ['max_position_embeddings'], C),
      ropeTheta,
      rmsEps: optNum(h, 'rms_norm_eps', 1e-6, C),
      mropeSections: [0, 1, 2, 3].map((i) => mrope[i] ?? 0) as [number, number, number, number],
      // Absent: HF's default for Qwen2.5-VL is untied; the converter decides from lm_head's presence.
      tiedEmbeddings: tied === true,
    },
    vision: {
      nLayer: num(v, ['depth'], V),
      nEmbd: num(v, ['hidden_size'], V),
      nHead: num(v, ['num_heads'], V),
      nFf: num(v, ['intermediate_size'], V),
      patchSize: num(v, ['patch_size', 'spatial_patch_size'], V),
      temporalPatchSize: optNum(v, 'temporal_patch_size', 2, V),
      spatialMergeSize: optNum(v, 'spatial_merge_size', 2, V),
      windowSize: optNum(v, 'window_size', 112, V),
      fullAttnBlocks: fullatt,
      outDim: num(v, ['out_hidden_size'], V),
      imageSize: optNum(v, 'image_size', 560, V),
      imageMean: mean as [number, number, number],
      imageStd: std as [number, number, number],
      minPixels: typeof preprocessor.min_pixels === 'number' ? preprocessor.min_pixels : optNum(size, 'shortest_edge', 3136, 'preprocessor_config.json size'),
      maxPixels: typeof preprocessor.max_pixels === 'number' ? preprocessor.max_pixels : optNum(size, 'longest_edge', 12845056, 'preprocessor_config.json size'),
      // The converter reads the root rms_norm_eps for the vision tower too.
      eps: optNum(config, 'rms_norm_eps', 1e-6, C),
    },
  };
  try {
    validatePreset({ name: 'config.json', ...shape });
  } catch (e) {
    throw new ConfigError(`${(e as Error).message} (llama.cpp cannot run this model)`);
  }
  return shape;
}

export interface HfConfigIds {
  bosId: number;
  eosId: number;
  /** <|vision_start|>, <|vision_end|>, <|vision_pad|>, <|image_pad|>, <|video_pad|> */
  vision: { start: number; end: number; pad: number; image: number; video: number };
}

/** config.json as a Qwen2.5-VL checkpoint saved by transformers 4.4x has it (text keys at the root). */
export function hfConfigFromShape(s: ModelShape, ids: HfConfigIds, torchDtype: 'bfloat16' | 'float16' | 'float32'): Json {
  const t = s.text;
  const v = s.vision;
  const mrope = [...t.mropeSections];
  while (mrope.length > 3 && mrope[mrope.length - 1] === 0) mrope.pop();
  return {
    architectures: ['Qwen2_5_VLForConditionalGeneration'],
    attention_dropout: 0.0,
    bos_token_id: ids.bosId,
    eos_token_id: ids.eosId,
    vision_start_token_id: ids.vision.start,
    vision_end_token_id: ids.vision.end,
    vision_token_id: ids.vision.pad,
    image_token_id: ids.vision.image,
    video_token_id: ids.vision.video,
    hidden_act: 'silu',
    hidden_size: t.nEmbd,
    initializer_range: 0.02,
    intermediate_size: t.nFf,
    max_position_embeddings: t.contextLength,
    max_window_layers: 70,
    model_type: 'qwen2_5_vl',
    num_attention_heads: t.nHead,
    num_hidden_layers: t.nLayer,
    num_key_value_heads: t.nHeadKv,
    rms_norm_eps: t.rmsEps,
    rope_theta: t.ropeTheta,
    sliding_window: 32768,
    tie_word_embeddings: t.tiedEmbeddings,
    torch_dtype: torchDtype,
    transformers_version: '4.49.0',
    use_cache: true,
    use_sliding_window: false,
    vision_config: {
      depth: v.nLayer,
      hidden_act: 'silu',
      hidden_size: v.nEmbd,
      intermediate_size: v.nFf,
      num_heads: v.nHead,
      in_chans: 3,
      out_hidden_size: v.outDim,
      patch_size: v.patchSize,
      spatial_merge_size: v.spatialMergeSize,
      spatial_patch_size: v.patchSize,
      window_size: v.windowSize,
      fullatt_block_indexes: [...v.fullAttnBlocks],
      tokens_per_second: 2,
      temporal_patch_size: v.temporalPatchSize,
    },
    rope_scaling: { type: 'mrope', mrope_section: mrope },
    vocab_size: t.vocabSize,
  };
}

/** preprocessor_config.json of Qwen2.5-VL. */
export function hfPreprocessorFromShape(s: ModelShape): Json {
  const v = s.vision;
  return {
    min_pixels: v.minPixels,
    max_pixels: v.maxPixels,
    patch_size: v.patchSize,
    temporal_patch_size: v.temporalPatchSize,
    merge_size: v.spatialMergeSize,
    image_mean: [...v.imageMean],
    image_std: [...v.imageStd],
    image_processor_type: 'Qwen2VLImageProcessor',
    processor_class: 'Qwen2_5_VLProcessor',
  };
}

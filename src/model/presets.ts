// Model shapes the generator knows. `caprl-3b` is CapRL-3B's true shape (Qwen2.5-VL-3B-Instruct:
// config.json + preprocessor_config.json); `tiny` keeps every structural feature (GQA, q/k/v
// biases, M-RoPE sections, tied embeddings, windowed + full vision attention, gated SiLU vision
// FFN, 2x2 patch merger) at a size that generates in well under a second.

export type PresetName = 'tiny' | 'caprl-3b';
export const PRESET_NAMES: readonly PresetName[] = ['tiny', 'caprl-3b'];

export interface TextConfig {
  /** hidden_size */
  nEmbd: number;
  /** num_hidden_layers */
  nLayer: number;
  /** num_attention_heads */
  nHead: number;
  /** num_key_value_heads */
  nHeadKv: number;
  /** intermediate_size */
  nFf: number;
  /** vocab_size (rows of token_embd) */
  vocabSize: number;
  /** Ids [0, nBpe) are BPE tokens; Qwen's added tokens start at nBpe (151643 for the real vocab). */
  nBpe: number;
  /** max_position_embeddings */
  contextLength: number;
  ropeTheta: number;
  rmsEps: number;
  /** rope_scaling.mrope_section padded to 4 entries; must sum to head_dim / 2. */
  mropeSections: [number, number, number, number];
  /** tie_word_embeddings: no output.weight, llama.cpp reuses token_embd. */
  tiedEmbeddings: boolean;
}

export interface VisionConfig {
  /** depth */
  nLayer: number;
  /** hidden_size */
  nEmbd: number;
  /** num_heads */
  nHead: number;
  /** intermediate_size */
  nFf: number;
  patchSize: number;
  temporalPatchSize: number;
  spatialMergeSize: number;
  /** window_size in pixels */
  windowSize: number;
  /** fullatt_block_indexes: must be evenly spaced, first = pattern - 1 (llama.cpp's n_wa_pattern). */
  fullAttnBlocks: number[];
  /** out_hidden_size (= text nEmbd) */
  outDim: number;
  /** clip.vision.image_size (the converter's default for Qwen2-VL: 560) */
  imageSize: number;
  imageMean: [number, number, number];
  imageStd: [number, number, number];
  /** preprocessor min_pixels / max_pixels (informational: llama.cpp's qwen2.5vl path does not read them). */
  minPixels: number;
  maxPixels: number;
  eps: number;
}

/**
 * The architecture of a model, without its name: what the tensor plans and the arch metadata
 * read. Presets are ModelShapes; so is a shape read from a Hugging Face config.json
 * (src/convert), which is how generated and converted files agree by construction.
 */
export interface ModelShape {
  text: TextConfig;
  vision: VisionConfig;
}

export interface Preset extends ModelShape {
  name: PresetName;
  /** general.name */
  modelName: string;
}

const CLIP_MEAN: [number, number, number] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [number, number, number] = [0.26862954, 0.26130258, 0.27577711];
/** The same in every Qwen2.5-VL size: preprocessor_config.json and the vision norm eps. */
const QWEN25VL_VISION_INPUT = {
  imageSize: 560,
  imageMean: CLIP_MEAN,
  imageStd: CLIP_STD,
  minPixels: 3136,
  maxPixels: 12845056,
  eps: 1e-6,
};

export const PRESETS: Record<PresetName, Preset> = {
  tiny: {
    name: 'tiny',
    modelName: 'CapRL-tiny (random weights)',
    text: {
      nEmbd: 128,
      nLayer: 2,
      nHead: 4,
      nHeadKv: 2,
      nFf: 320,
      vocabSize: 2048,
      nBpe: 2000,
      contextLength: 32768,
      ropeTheta: 1000000,
      rmsEps: 1e-6,
      mropeSections: [4, 6, 6, 0], // head_dim 32 → 16 rotary pairs, same 2:3:3 split as 16/24/24
      tiedEmbeddings: true,
    },
    vision: {
      nLayer: 4,
      nEmbd: 128,
      nHead: 4,
      nFf: 200, // like the real 3420, not a multiple of 32: ffn_down stays F16 in q8_0 files
      patchSize: 14,
      temporalPatchSize: 2,
      spatialMergeSize: 2,
      windowSize: 112,
      fullAttnBlocks: [1, 3],
      outDim: 128,
      ...QWEN25VL_VISION_INPUT,
    },
  },
  'caprl-3b': {
    name: 'caprl-3b',
    modelName: 'CapRL-3B (random weights)',
    text: {
      nEmbd: 2048,
      nLayer: 36,
      nHead: 16,
      nHeadKv: 2,
      nFf: 11008,
      vocabSize: 151936,
      nBpe: 151643,
      contextLength: 128000,
      ropeTheta: 1000000,
      rmsEps: 1e-6,
      mropeSections: [16, 24, 24, 0],
      tiedEmbeddings: true,
    },
    vision: {
      nLayer: 32,
      nEmbd: 1280,
      nHead: 16,
      nFf: 3420,
      patchSize: 14,
      temporalPatchSize: 2,
      spatialMergeSize: 2,
      windowSize: 112,
      fullAttnBlocks: [7, 15, 23, 31],
      outDim: 2048,
      ...QWEN25VL_VISION_INPUT,
    },
  },
};

export function getPreset(name: string): Preset {
  const p = (PRESETS as Record<string, Preset>)[name];
  if (!p) throw new Error(`unknown preset "${name}" (expected one of: ${PRESET_NAMES.join(', ')})`);
  validatePreset(p);
  return p;
}

/** The llama.cpp-side constraints a preset (or a converted model's shape) must meet. */
export function validatePreset(p: ModelShape & { name: string }): void {
  const t = p.text;
  const v = p.vision;
  const fail = (m: string): never => {
    throw new Error(`preset ${p.name}: ${m}`);
  };
  if (t.nEmbd % t.nHead) fail('text nEmbd % nHead != 0');
  if (t.nHead % t.nHeadKv) fail('text nHead % nHeadKv != 0');
  const headDim = t.nEmbd / t.nHead;
  const secSum = t.mropeSections.reduce((a, b) => a + b, 0);
  if (secSum * 2 !== headDim) fail(`mrope sections sum ${secSum} != head_dim/2 = ${headDim / 2}`);
  if (v.nEmbd % v.nHead) fail('vision nEmbd % nHead != 0');
  if ((v.nEmbd / v.nHead) % 4) fail('vision head_dim must be a multiple of 4 (vision M-RoPE uses d_head/4 sections)');
  if (v.nFf === v.nEmbd) fail('vision nFf == nEmbd makes clip.cpp swap ffn_up/ffn_down (legacy-file heuristic)');
  if (v.outDim !== t.nEmbd) fail('vision outDim must equal text nEmbd');
  if (v.spatialMergeSize !== 2) fail('llama.cpp hardcodes a 2x2 merge for qwen2.5vl');
  if (v.temporalPatchSize !== 2) fail('llama.cpp only supports temporal_patch_size 2');
  const fa = v.fullAttnBlocks;
  if (fa.length === 0) fail('fullAttnBlocks is empty');
  const pattern = fa[0] + 1;
  for (let il = 0; il < v.nLayer; il++) {
    if (((il + 1) % pattern === 0) !== fa.includes(il)) {
      fail(`fullAttnBlocks ${fa.join(',')} is not expressible as llama.cpp's (il + 1) % n_wa_pattern == 0`);
    }
  }
  if (fa.some((b) => b >= v.nLayer)) fail('fullAttnBlocks beyond depth');
}

/** llama.cpp's clip.vision.n_wa_pattern for a preset (fullatt_block_indexes[0] + 1). */
export function windowAttentionPattern(v: VisionConfig): number {
  return v.fullAttnBlocks[0] + 1;
}

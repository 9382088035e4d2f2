// Hugging Face Qwen2.5-VL tensor names -> the GGUF tensors of src/model/qwen25vl.ts, as llama.cpp's
// converter maps them (gguf-py/gguf/tensor_mapping.py; conversion/qwenvl.py Qwen2VLVisionModel):
//   - text: model.embed_tokens / model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
//     post_attention_layernorm, mlp.{gate,up,down}_proj} / model.norm / lm_head
//   - vision: visual.patch_embed.proj (Conv3D [C, 3, 2, p, p]) split along the temporal axis into
//     v.patch_embd.weight and v.patch_embd.weight.1; visual.blocks.N.attn.qkv (fused [3C, C] and
//     [3C]) split by rows into attn_q/k/v; norm1/norm2 -> ln1/ln2; attn.proj -> attn_out;
//     mlp.{gate,up,down}_proj; merger.ln_q -> v.post_ln; merger.mlp.0/2 -> mm.0/mm.2.
// Newer transformers save the same weights as model.language_model.* and model.visual.*; both
// spellings are accepted. A PyTorch shape [a, b] is ggml's ne [b, a]; a row split or a temporal
// slice is a set of byte ranges of the source tensor, so nothing is ever transposed.

import { elementCount } from '../model/gguf.js';
import type { PlannedTensor } from '../model/qwen25vl.js';

/** How one GGUF tensor is cut out of one HF tensor: `blocks` runs of `len` elements, `stride` apart, from `first`. */
export interface Extract {
  first: number;
  blocks: number;
  stride: number;
  len: number;
}

interface Rule {
  /** HF name pattern: {bid} a block number, {wb} weight|bias, {mm} a merger MLP index */
  hf: string;
  /** GGUF name pattern(s); several = the HF tensor is split */
  gguf: string[];
  split?: 'rows' | 'temporal';
}

const rule = (hf: string, gguf: string | string[], split?: Rule['split']): Rule => ({ hf, gguf: typeof gguf === 'string' ? [gguf] : gguf, split });
const T = 'model.layers.{bid}';
const V = 'visual.blocks.{bid}';
const B = 'v.blk.{bid}';

export const QWEN25VL_RULES: readonly Rule[] = [
  rule('model.embed_tokens.weight', 'token_embd.weight'),
  rule('model.norm.weight', 'output_norm.weight'),
  rule('lm_head.weight', 'output.weight'),
  rule(`${T}.input_layernorm.weight`, 'blk.{bid}.attn_norm.weight'),
  rule(`${T}.self_attn.q_proj.{wb}`, 'blk.{bid}.attn_q.{wb}'),
  rule(`${T}.self_attn.k_proj.{wb}`, 'blk.{bid}.attn_k.{wb}'),
  rule(`${T}.self_attn.v_proj.{wb}`, 'blk.{bid}.attn_v.{wb}'),
  rule(`${T}.self_attn.o_proj.weight`, 'blk.{bid}.attn_output.weight'),
  rule(`${T}.post_attention_layernorm.weight`, 'blk.{bid}.ffn_norm.weight'),
  rule(`${T}.mlp.gate_proj.weight`, 'blk.{bid}.ffn_gate.weight'),
  rule(`${T}.mlp.up_proj.weight`, 'blk.{bid}.ffn_up.weight'),
  rule(`${T}.mlp.down_proj.weight`, 'blk.{bid}.ffn_down.weight'),
  rule('visual.patch_embed.proj.weight', ['v.patch_embd.weight', 'v.patch_embd.weight.1'], 'temporal'),
  rule(`${V}.norm1.weight`, `${B}.ln1.weight`),
  rule(`${V}.attn.qkv.{wb}`, [`${B}.attn_q.{wb}`, `${B}.attn_k.{wb}`, `${B}.attn_v.{wb}`], 'rows'),
  rule(`${V}.attn.proj.{wb}`, `${B}.attn_out.{wb}`),
  rule(`${V}.norm2.weight`, `${B}.ln2.weight`),
  rule(`${V}.mlp.gate_proj.{wb}`, `${B}.ffn_gate.{wb}`),
  rule(`${V}.mlp.up_proj.{wb}`, `${B}.ffn_up.{wb}`),
  rule(`${V}.mlp.down_proj.{wb}`, `${B}.ffn_down.{wb}`),
  rule('visual.merger.ln_q.weight', 'v.post_ln.weight'),
  rule('visual.merger.mlp.{mm}.{wb}', 'mm.{mm}.{wb}'),
];

/** HF tensors the converter drops (as llama.cpp's does). */
export function isIgnoredHfTensor(name: string): boolean {
  return /\.rotary_emb\.inv_freq$|\.attention\.masked_bias$/.test(name);
}

/** transformers >= 4.52 names (model.language_model.*, model.visual.*) -> the classic ones. */
export function canonicalHfName(name: string): string {
  return name.replace(/^model\.language_model\./, 'model.').replace(/^model\.visual\./, 'visual.');
}

const VARS: Record<string, string> = { bid: '(\\d+)', wb: '(weight|bias)', mm: '(0|2)' };

function compile(pattern: string): { re: RegExp; vars: string[] } {
  const vars: string[] = [];
  const src = pattern.replace(/[.]/g, '\\.').replace(/\{(\w+)\}/g, (_m, v: string) => {
    vars.push(v);
    return VARS[v];
  });
  return { re: new RegExp(`^${src}$`), vars };
}

const fill = (pattern: string, vals: Record<string, string>) => pattern.replace(/\{(\w+)\}/g, (_m, v: string) => vals[v]);
const compiledHf = QWEN25VL_RULES.map((r) => compile(r.hf));
const compiledGguf = QWEN25VL_RULES.map((r) => r.gguf.map(compile));

export interface MappedPart {
  gguf: string;
  /** ggml ne[] order */
  shape: number[];
  extract: Extract;
}

export class MappingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MappingError';
  }
}

/**
 * The GGUF tensor(s) an HF tensor becomes, with their shapes and where their elements are in
 * the HF tensor; null for an HF tensor that is not part of Qwen2.5-VL.
 */
export function mapHfTensor(hfName: string, hfShape: readonly number[]): MappedPart[] | null {
  const name = canonicalHfName(hfName);
  for (const [i, r] of QWEN25VL_RULES.entries()) {
    const m = compiledHf[i].re.exec(name);
    if (!m) continue;
    const vals: Record<string, string> = {};
    compiledHf[i].vars.forEach((v, k) => (vals[v] = m[k + 1]));
    const names = r.gguf.map((g) => fill(g, vals));
    const n = elementCount(hfShape);
    const ne = [...hfShape].reverse();
    if (!r.split) return [{ gguf: names[0], shape: ne, extract: { first: 0, blocks: 1, stride: n, len: n } }];
    if (r.split === 'rows') {
      const k = names.length;
      if (hfShape[0] % k) throw new MappingError(`${hfName}: ${hfShape[0]} rows do not split into ${k} equal parts (q, k, v)`);
      const part = n / k;
      const partNe = [...ne.slice(0, -1), hfShape[0] / k];
      return names.map((g, j) => ({ gguf: g, shape: partNe, extract: { first: j * part, blocks: 1, stride: part, len: part } }));
    }
    // temporal: [C, ch, kt, kh, kw] -> kt kernels [C, ch, kh, kw]
    if (hfShape.length !== 5 || hfShape[2] !== names.length) {
      throw new MappingError(`${hfName}: expected a Conv3D weight [C, 3, ${names.length}, p, p], got [${hfShape.join(', ')}] (llama.cpp supports temporal_patch_size ${names.length} only)`);
    }
    const [C, ch, kt, kh, kw] = hfShape;
    const plane = kh * kw;
    return names.map((g, t) => ({ gguf: g, shape: [kw, kh, ch, C], extract: { first: t * plane, blocks: C * ch, stride: kt * plane, len: plane } }));
  }
  return null;
}

/** The HF tensor (classic name) a GGUF tensor comes from, and its index among that tensor's parts. */
export function hfSourceOf(ggufName: string): { hf: string; part: number; parts: number; split?: Rule['split'] } | null {
  for (const [i, r] of QWEN25VL_RULES.entries()) {
    for (const [j, c] of compiledGguf[i].entries()) {
      const m = c.re.exec(ggufName);
      if (!m) continue;
      const vals: Record<string, string> = {};
      c.vars.forEach((v, k) => (vals[v] = m[k + 1]));
      return { hf: fill(r.hf, vals), part: j, parts: r.gguf.length, split: r.split };
    }
  }
  return null;
}

/** One tensor of an HF checkpoint, built from planned GGUF tensors (for writing test checkpoints). */
export interface HfTensorFromPlan {
  name: string;
  /** PyTorch order */
  shape: number[];
  parts: PlannedTensor[];
  split?: Rule['split'];
}

/** The HF checkpoint's tensors that hold the planned GGUF tensors (the inverse of mapHfTensor). */
export function hfTensorsFromPlan(planned: readonly PlannedTensor[]): HfTensorFromPlan[] {
  const byHf = new Map<string, HfTensorFromPlan>();
  for (const p of planned) {
    const src = hfSourceOf(p.name);
    if (!src) throw new MappingError(`${p.name} has no Hugging Face counterpart`);
    let e = byHf.get(src.hf);
    if (!e) byHf.set(src.hf, (e = { name: src.hf, shape: [], parts: new Array(src.parts), split: src.split }));
    e.parts[src.part] = p;
  }
  for (const e of byHf.values()) {
    const ne = e.parts[0].shape;
    const torch = [...ne].reverse();
    if (e.split === 'rows') torch[0] *= e.parts.length;
    e.shape = e.split === 'temporal' ? [ne[3], ne[2], e.parts.length, ne[1], ne[0]] : torch;
  }
  return [...byHf.values()];
}

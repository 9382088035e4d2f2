// Embedded byte-level BPE tokenizer in the shape of Qwen2's (tokenizer.ggml.model "gpt2",
// pre-tokenizer "qwen2"), stored as GGUF metadata.
//
// Vocabulary layout, mirroring Qwen2.5-VL's:
//   [0, 256)                 the 256 byte tokens, in GPT-2 bytes_to_unicode order (id 0 = "!")
//   [256, nBpe)              merge results: first merges learned by BPE training on an embedded
//                            English corpus, then synthetic merges (word + suffix) filling the
//                            range so that every id is a reachable, printable token
//   [nBpe, nBpe + 22)        Qwen's added tokens (<|endoftext|> ... <|file_sep|>), in Qwen's order
//   [nBpe + 22, vocabSize)   "[PAD<id>]" unused tokens, as the HF→GGUF converter writes them
// With nBpe = 151643 and vocabSize = 151936 the special ids are Qwen's real ones.
//
// The vocabulary does not depend on the weight seed: token ids are stable across seeds.

import { BPE_TRAINING_CORPUS } from './corpus.js';
import { GGUFMetadata, GGUFValueType } from './gguf.js';

/** llama.cpp token types (tokenizer.ggml.token_type). */
export enum TokenType {
  NORMAL = 1,
  UNKNOWN = 2,
  CONTROL = 3,
  USER_DEFINED = 4,
  UNUSED = 5,
  BYTE = 6,
}

/** Qwen2/2.5-VL added tokens in id order starting at the first id after the BPE range. */
export const QWEN_ADDED_TOKENS: ReadonlyArray<{ text: string; type: TokenType }> = [
  { text: '<|endoftext|>', type: TokenType.CONTROL },
  { text: '<|im_start|>', type: TokenType.CONTROL },
  { text: '<|im_end|>', type: TokenType.CONTROL },
  { text: '<|object_ref_start|>', type: TokenType.CONTROL },
  { text: '<|object_ref_end|>', type: TokenType.CONTROL },
  { text: '<|box_start|>', type: TokenType.CONTROL },
  { text: '<|box_end|>', type: TokenType.CONTROL },
  { text: '<|quad_start|>', type: TokenType.CONTROL },
  { text: '<|quad_end|>', type: TokenType.CONTROL },
  { text: '<|vision_start|>', type: TokenType.CONTROL },
  { text: '<|vision_end|>', type: TokenType.CONTROL },
  { text: '<|vision_pad|>', type: TokenType.CONTROL },
  { text: '<|image_pad|>', type: TokenType.CONTROL },
  { text: '<|video_pad|>', type: TokenType.CONTROL },
  // Not "special" in HF's tokenizer_config: the converter writes <tool_call> as USER_DEFINED and
  // the <|...|> ones as CONTROL (they look special). llama.cpp makes <|fim_pad|>, <|repo_name|>
  // and <|file_sep|> end-of-generation tokens by their text, as for the real model.
  { text: '<tool_call>', type: TokenType.USER_DEFINED },
  { text: '</tool_call>', type: TokenType.USER_DEFINED },
  { text: '<|fim_prefix|>', type: TokenType.CONTROL },
  { text: '<|fim_middle|>', type: TokenType.CONTROL },
  { text: '<|fim_suffix|>', type: TokenType.CONTROL },
  { text: '<|fim_pad|>', type: TokenType.CONTROL },
  { text: '<|repo_name|>', type: TokenType.CONTROL },
  { text: '<|file_sep|>', type: TokenType.CONTROL },
];

/** GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 and up. */
export function bytesToUnicode(): { order: number[]; byteToChar: string[]; charToByte: Map<string, number> } {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  const byteToChar: string[] = new Array(256);
  const charToByte = new Map<string, number>();
  for (let i = 0; i < 256; i++) {
    const ch = String.fromCodePoint(cs[i]);
    byteToChar[bs[i]] = ch;
    charToByte.set(ch, bs[i]);
  }
  return { order: bs, byteToChar, charToByte };
}

const B2U = bytesToUnicode();

/** Qwen2's pre-tokenizer regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2). */
const QWEN2_PRETOKENIZE =
  /(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+/gu;

/** Split text into pre-tokens (before byte-level mapping). */
export function pretokenize(text: string): string[] {
  return text.match(QWEN2_PRETOKENIZE) ?? [];
}

/** UTF-8 bytes of a string mapped through bytes_to_unicode. */
export function toByteLevel(s: string): string {
  const bytes = Buffer.from(s, 'utf8');
  let out = '';
  for (const b of bytes) out += B2U.byteToChar[b];
  return out;
}

/** Inverse of toByteLevel for a token's text (returns raw bytes). */
export function fromByteLevel(token: string): Buffer {
  const out: number[] = [];
  for (const ch of token) {
    const b = B2U.charToByte.get(ch);
    if (b === undefined) return Buffer.from(token, 'utf8'); // special/added tokens are plain text
    out.push(b);
  }
  return Buffer.from(out);
}

/**
 * Train byte-level BPE merges on `corpus`: repeatedly merge the most frequent adjacent pair
 * (ties: smallest "a b" string), stopping at `maxMerges` or when no pair occurs twice.
 */
export function trainBpe(corpus: string, maxMerges: number): Array<[string, string]> {
  const counts = new Map<string, number>();
  for (const p of pretokenize(corpus)) {
    const w = toByteLevel(p);
    counts.set(w, (counts.get(w) ?? 0) + 1);
  }
  const words: Array<{ syms: string[]; n: number }> = [...counts.entries()]
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map(([w, n]) => ({ syms: Array.from(w), n }));
  const merges: Array<[string, string]> = [];
  while (merges.length < maxMerges) {
    const pairs = new Map<string, number>();
    for (const { syms, n } of words) {
      for (let i = 0; i + 1 < syms.length; i++) {
        const k = syms[i] + ' ' + syms[i + 1];
        pairs.set(k, (pairs.get(k) ?? 0) + n);
      }
    }
    let best = '';
    let bestN = 1;
    for (const [k, n] of pairs) {
      if (n > bestN || (n === bestN && best !== '' && k < best)) {
        best = k;
        bestN = n;
      }
    }
    if (!best || bestN < 2) break;
    const sp = best.indexOf(' ');
    const a = best.slice(0, sp);
    const b = best.slice(sp + 1);
    merges.push([a, b]);
    const ab = a + b;
    for (const w of words) {
      const s = w.syms;
      if (s.length < 2) continue;
      const out: string[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(ab);
          i++;
        } else out.push(s[i]);
      }
      w.syms = out;
    }
  }
  return merges;
}

export interface VocabSpec {
  /** Total tokens (rows of token_embd). */
  vocabSize: number;
  /** Ids [0, nBpe) are byte-level BPE tokens; Qwen's added tokens start at nBpe. */
  nBpe: number;
}

export interface Vocab {
  tokens: string[];
  types: TokenType[];
  /** Merges in rank order, as "a b". */
  merges: string[];
  /** Token text → id. */
  ids: Map<string, number>;
  /** Ids of the Qwen added tokens by text. */
  special: Record<string, number>;
  bosId: number;
  eosId: number;
  eotId: number;
  padId: number;
  /** Ids llama.cpp treats as end-of-generation (derived from token text, as llama-vocab.cpp does). */
  eogIds: number[];
}

const vocabCache = new Map<string, Vocab>();

/** Suffix pieces used to grow synthetic merges (used only where they exist as tokens). */
const SYNTH_SUFFIXES = ['s', 'es', 'ed', 'ing', 'er', 'ers', 'ly', 'al', 'ion', 'ions', 'ness', 'ful', 'ment', 'able', 'ity', 'ic', 'ive', 'ous', 'est', 'en'];

/** Build (and memoize) the vocabulary for a spec. Deterministic. */
export function buildVocab(spec: VocabSpec): Vocab {
  const key = `${spec.vocabSize}/${spec.nBpe}`;
  const cached = vocabCache.get(key);
  if (cached) return cached;
  const nAdded = QWEN_ADDED_TOKENS.length;
  if (spec.nBpe < 256 + 64) throw new Error(`nBpe ${spec.nBpe} too small`);
  if (spec.vocabSize < spec.nBpe + nAdded) throw new Error(`vocabSize ${spec.vocabSize} < nBpe + ${nAdded}`);

  const tokens: string[] = [];
  const types: TokenType[] = [];
  const ids = new Map<string, number>();
  const add = (t: string, type: TokenType): number => {
    if (ids.has(t)) throw new Error(`duplicate token ${JSON.stringify(t)}`);
    const id = tokens.length;
    tokens.push(t);
    types.push(type);
    ids.set(t, id);
    return id;
  };
  for (const b of B2U.order) add(B2U.byteToChar[b], TokenType.NORMAL);

  // Learned merges.
  const merges: string[] = [];
  const room = spec.nBpe - 256;
  for (const [a, b] of trainBpe(BPE_TRAINING_CORPUS, room)) {
    merges.push(`${a} ${b}`);
    add(a + b, TokenType.NORMAL);
  }

  // Synthetic merges: grow word-like tokens with suffixes until the BPE range is full.
  const isWordish = (t: string): boolean => /^\u0120?[A-Za-z]+$/.test(t);
  const suffixes = [...'abcdefghijklmnopqrstuvwxyz'].concat(SYNTH_SUFFIXES.filter((s) => s.length > 1 && ids.has(s)));
  const queue: string[] = tokens.slice(256).filter(isWordish);
  if (queue.length === 0) queue.push(...[...'abcdefghijklmnopqrstuvwxyz'].map((c) => '\u0120' + c).filter((t) => ids.has(t)));
  for (let qi = 0; tokens.length < spec.nBpe; qi++) {
    if (qi >= queue.length) throw new Error('internal: synthetic merge queue exhausted');
    const a = queue[qi];
    for (const s of suffixes) {
      if (tokens.length >= spec.nBpe) break;
      const t = a + s;
      if (ids.has(t)) continue;
      merges.push(`${a} ${s}`);
      add(t, TokenType.NORMAL);
      queue.push(t);
    }
  }

  const special: Record<string, number> = {};
  for (const { text, type } of QWEN_ADDED_TOKENS) special[text] = add(text, type);
  while (tokens.length < spec.vocabSize) add(`[PAD${tokens.length}]`, TokenType.UNUSED);

  const eogTexts = ['<|im_end|>', '<|endoftext|>', '<|fim_pad|>', '<|repo_name|>', '<|file_sep|>'];
  const v: Vocab = {
    tokens,
    types,
    merges,
    ids,
    special,
    bosId: special['<|endoftext|>'],
    eosId: special['<|im_end|>'],
    eotId: special['<|im_end|>'],
    padId: special['<|endoftext|>'],
    eogIds: eogTexts.map((t) => special[t]).sort((a, b) => a - b),
  };
  vocabCache.set(key, v);
  return v;
}

/** Merge ranks ("a b" → rank) of a vocabulary, memoized. */
const rankCache = new WeakMap<Vocab, Map<string, number>>();
function ranks(v: Vocab): Map<string, number> {
  let r = rankCache.get(v);
  if (!r) {
    r = new Map(v.merges.map((m, i) => [m, i]));
    rankCache.set(v, r);
  }
  return r;
}

function bpeWord(v: Vocab, word: string): number[] {
  const r = ranks(v);
  let syms = Array.from(word);
  while (syms.length > 1) {
    let bestRank = Infinity;
    let bestI = -1;
    for (let i = 0; i + 1 < syms.length; i++) {
      const rk = r.get(syms[i] + ' ' + syms[i + 1]);
      if (rk !== undefined && rk < bestRank) {
        bestRank = rk;
        bestI = i;
      }
    }
    if (bestI < 0) break;
    const a = syms[bestI];
    const b = syms[bestI + 1];
    const out: string[] = [];
    for (let i = 0; i < syms.length; i++) {
      if (i + 1 < syms.length && syms[i] === a && syms[i + 1] === b) {
        out.push(a + b);
        i++;
      } else out.push(syms[i]);
    }
    syms = out;
  }
  const res: number[] = [];
  for (const s of syms) {
    const id = v.ids.get(s);
    if (id !== undefined) res.push(id);
    else for (const ch of s) res.push(v.ids.get(ch)!);
  }
  return res;
}

/**
 * Reference tokenization (what llama.cpp's BPE tokenizer computes for this vocabulary).
 * With `parseSpecial`, control/user-defined added tokens in the text map to their ids.
 */
export function encode(v: Vocab, text: string, opts: { parseSpecial?: boolean } = {}): number[] {
  const out: number[] = [];
  const parts: Array<{ text: string; special: boolean }> = [];
  if (opts.parseSpecial) {
    const specials = QWEN_ADDED_TOKENS.map((t) => t.text).sort((a, b) => b.length - a.length);
    let rest = text;
    while (rest.length) {
      let cut = -1;
      let which = '';
      for (const s of specials) {
        const i = rest.indexOf(s);
        if (i >= 0 && (cut < 0 || i < cut)) {
          cut = i;
          which = s;
        }
      }
      if (cut < 0) {
        parts.push({ text: rest, special: false });
        break;
      }
      if (cut > 0) parts.push({ text: rest.slice(0, cut), special: false });
      parts.push({ text: which, special: true });
      rest = rest.slice(cut + which.length);
    }
  } else parts.push({ text, special: false });
  for (const p of parts) {
    if (p.special) out.push(v.special[p.text]);
    else for (const w of pretokenize(p.text)) out.push(...bpeWord(v, toByteLevel(w)));
  }
  return out;
}

/** Detokenize: control and unused tokens render as nothing unless `renderSpecial`. */
export function decode(v: Vocab, ids: readonly number[], opts: { renderSpecial?: boolean } = {}): string {
  const bufs: Buffer[] = [];
  for (const id of ids) {
    const t = v.tokens[id];
    const ty = v.types[id];
    if (ty === TokenType.NORMAL) bufs.push(fromByteLevel(t));
    else if (ty === TokenType.USER_DEFINED || (ty === TokenType.CONTROL && opts.renderSpecial)) bufs.push(Buffer.from(t, 'utf8'));
  }
  return Buffer.concat(bufs).toString('utf8');
}

/**
 * What the tokenizer.* keys hold: a generated Vocab is one; so is a vocabulary read from a
 * Hugging Face tokenizer.json (src/convert/hf-tokenizer.ts). Absent special ids are not written.
 */
export interface TokenizerMetadataSource {
  tokens: readonly string[];
  types: readonly TokenType[];
  /** Merges in rank order, as "a b". */
  merges: readonly string[];
  eosId: number;
  padId?: number;
  bosId?: number;
  eotId?: number;
}

/** Write the tokenizer.* keys (vocabulary, merges, special ids, chat template). */
export function addTokenizerMetadata(meta: GGUFMetadata, v: TokenizerMetadataSource, chatTemplate: string): void {
  meta.str('tokenizer.ggml.model', 'gpt2');
  meta.str('tokenizer.ggml.pre', 'qwen2');
  meta.arr('tokenizer.ggml.tokens', GGUFValueType.STRING, [...v.tokens]);
  meta.arr('tokenizer.ggml.token_type', GGUFValueType.INT32, [...v.types]);
  meta.arr('tokenizer.ggml.merges', GGUFValueType.STRING, [...v.merges]);
  meta.u32('tokenizer.ggml.eos_token_id', v.eosId);
  if (v.padId !== undefined) meta.u32('tokenizer.ggml.padding_token_id', v.padId);
  if (v.bosId !== undefined) meta.u32('tokenizer.ggml.bos_token_id', v.bosId);
  // Explicit, so llama.cpp does not pick between <|im_end|> and <|endoftext|> by hash order.
  if (v.eotId !== undefined) meta.u32('tokenizer.ggml.eot_token_id', v.eotId);
  meta.bool('tokenizer.ggml.add_bos_token', false);
  meta.str('tokenizer.chat_template', chatTemplate);
}

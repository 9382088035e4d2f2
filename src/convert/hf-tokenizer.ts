// A Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json) <-> the GGUF tokenizer
// keys, as llama.cpp's converter writes them for Qwen2 (conversion/base.py _set_vocab_gpt2,
// get_vocab_base; gguf-py/gguf/vocab.py SpecialVocab):
//   tokenizer.ggml.model "gpt2", pre "qwen2"; one token per id below vocab_size (config.json):
//   the BPE vocabulary, then the added tokens: CONTROL if `special` or looking special
//   (<|...|>), USER_DEFINED otherwise; ids with no token become "[PAD<id>]" (UNUSED).
//   Merges from model.merges ("a b" strings, or [a, b] pairs with spaces encoded as U+0120).
//   Special ids: tokenizer_config's bos/eos/pad token text looked up among the added tokens,
//   then config.json's *_token_id (then generation_config.json's, where they are single ids).
// Differences, on purpose: the pre-tokenizer is checked against Qwen2's regex instead of being
// detected by hashing a tokenization (which needs the tokenizers library); eot is written
// explicitly as <|im_end|> (as the generated models do) so llama.cpp does not guess it.

import { QWEN_ADDED_TOKENS, TokenType, type TokenizerMetadataSource, type Vocab } from '../model/tokenizer.js';

export class TokenizerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TokenizerError';
  }
}

type Json = Record<string, unknown>;

/** Qwen2's pre-tokenizer split, as tokenizer.json spells it (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2). */
export const QWEN2_SPLIT_REGEX =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const BYTE_LEVEL = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false };

interface AddedToken {
  id: number;
  content: string;
  special: boolean;
}

/** Mirrors the converter's does_token_look_special for the Qwen family. */
function looksSpecial(t: string): boolean {
  return t.startsWith('<|') && t.endsWith('|>');
}

function splitRegexes(pre: unknown): string[] {
  const out: string[] = [];
  const walk = (p: unknown): void => {
    if (!p || typeof p !== 'object') return;
    const o = p as Json;
    if (o.type === 'Sequence' && Array.isArray(o.pretokenizers)) o.pretokenizers.forEach(walk);
    if (o.type === 'Split') {
      const pat = o.pattern as Json | undefined;
      out.push(String(pat?.Regex ?? pat?.String ?? ''));
    }
  };
  walk(pre);
  return out;
}

export interface HfTokenizerFiles {
  /** Parsed tokenizer.json */
  tokenizer: Json;
  /** Parsed tokenizer_config.json, if present */
  tokenizerConfig?: Json;
  /** Parsed config.json */
  config: Json;
  /** Parsed generation_config.json, if present */
  generationConfig?: Json;
  /** config.json's vocab_size (text hparams): rows of token_embd */
  vocabSize: number;
}

export interface HfVocab extends TokenizerMetadataSource {
  /** First added-token id (151643 for Qwen): the BPE range is [0, nBpe). */
  nBpe: number;
}

/** GGUF tokenizer metadata from a Qwen2-style tokenizer.json. Errors name tokenizer.json and what is wrong. */
export function vocabFromHf(f: HfTokenizerFiles): HfVocab {
  const fail = (m: string): never => {
    throw new TokenizerError(`tokenizer.json: ${m}`);
  };
  const model = f.tokenizer.model as Json | undefined;
  if (!model || model.type !== 'BPE') fail(`model.type is ${JSON.stringify(model?.type)}; only byte-level BPE (Qwen2) tokenizers are supported`);
  const regexes = splitRegexes(f.tokenizer.pre_tokenizer);
  if (regexes.length !== 1 || regexes[0] !== QWEN2_SPLIT_REGEX) {
    fail(`the pre-tokenizer is not Qwen2's (Split regex ${JSON.stringify(regexes)}); llama.cpp's "qwen2" pre-tokenizer would split text differently`);
  }
  const vocab = model!.vocab;
  if (!vocab || typeof vocab !== 'object' || Array.isArray(vocab)) fail('model.vocab is not an object');
  const added: AddedToken[] = [];
  for (const a of (Array.isArray(f.tokenizer.added_tokens) ? f.tokenizer.added_tokens : []) as Json[]) {
    if (typeof a.id !== 'number' || typeof a.content !== 'string') fail(`bad added_tokens entry ${JSON.stringify(a)}`);
    added.push({ id: a.id as number, content: a.content as string, special: a.special === true });
  }
  const n = f.vocabSize;
  const tokens: string[] = new Array(n);
  const types: TokenType[] = new Array(n);
  for (const [text, id] of Object.entries(vocab as Record<string, unknown>)) {
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0) fail(`model.vocab[${JSON.stringify(text)}] is not a token id`);
    if ((id as number) >= n) fail(`token ${JSON.stringify(text)} has id ${id}, beyond config.json's vocab_size ${n}`);
    if (tokens[id as number] !== undefined) fail(`id ${id} is used by two tokens`);
    tokens[id as number] = text;
    types[id as number] = TokenType.NORMAL;
  }
  for (const a of added) {
    if (a.id >= n) fail(`added token ${JSON.stringify(a.content)} has id ${a.id}, beyond config.json's vocab_size ${n}`);
    if (tokens[a.id] !== undefined && tokens[a.id] !== a.content) fail(`id ${a.id} is both ${JSON.stringify(tokens[a.id])} and added token ${JSON.stringify(a.content)}`);
    tokens[a.id] = a.content;
    types[a.id] = a.special || looksSpecial(a.content) ? TokenType.CONTROL : TokenType.USER_DEFINED;
  }
  for (let i = 0; i < n; i++) {
    if (tokens[i] === undefined) {
      tokens[i] = `[PAD${i}]`;
      types[i] = TokenType.UNUSED;
    }
  }
  const rawMerges = model!.merges;
  if (!Array.isArray(rawMerges) || rawMerges.length === 0) fail('model.merges is missing or empty');
  const merges = (rawMerges as unknown[]).map((m, i): string => {
    if (typeof m === 'string') return m;
    if (Array.isArray(m) && m.length === 2 && typeof m[0] === 'string' && typeof m[1] === 'string') {
      return m.map((part: string) => part.replace(/ /g, '\u0120')).join(' ');
    }
    return fail(`model.merges[${i}] is neither "a b" nor ["a", "b"]`);
  });

  // Special ids, in SpecialVocab's order: tokenizer_config text → added token id, then config ids.
  const ids: Record<'bos' | 'eos' | 'pad', number | undefined> = { bos: undefined, eos: undefined, pad: undefined };
  for (const typ of ['bos', 'eos', 'pad'] as const) {
    const entry = f.tokenizerConfig?.[`${typ}_token`];
    const text = typeof entry === 'string' ? entry : typeof (entry as Json | null)?.content === 'string' ? (entry as Json).content : undefined;
    if (text !== undefined) ids[typ] = added.find((a) => a.content === text)?.id;
  }
  for (const src of [f.config, f.config.text_config as Json | undefined, f.generationConfig]) {
    for (const typ of ['bos', 'eos', 'pad'] as const) {
      const v = src?.[`${typ}_token_id`];
      if (ids[typ] === undefined && typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < n) ids[typ] = v;
    }
  }
  const byText = (t: string) => added.find((a) => a.content === t)?.id;
  const eosId = ids.eos ?? byText('<|im_end|>') ?? byText('<|endoftext|>');
  if (eosId === undefined) fail('no end-of-sequence token: tokenizer_config.json has no eos_token and config.json no eos_token_id');
  const firstAdded = added.length ? Math.min(...added.map((a) => a.id)) : n;
  return { tokens, types, merges, eosId: eosId!, bosId: ids.bos, padId: ids.pad, eotId: byText('<|im_end|>') ?? eosId!, nBpe: firstAdded };
}

/**
 * tokenizer.json for a generated vocabulary (test fixtures): Qwen2's pipeline, the BPE range as
 * model.vocab, the added tokens with Qwen2.5-VL's `special` flags (<tool_call>, </tool_call> and
 * the <|fim_*|>-family are not special; the converter still makes the <|...|> ones CONTROL).
 */
export function tokenizerJsonFromVocab(v: Vocab): Json {
  const nBpe = v.special[QWEN_ADDED_TOKENS[0].text];
  const vocab: Record<string, number> = {};
  for (let i = 0; i < nBpe; i++) vocab[v.tokens[i]] = i;
  const firstNonSpecial = QWEN_ADDED_TOKENS.findIndex((t) => t.text === '<tool_call>');
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: QWEN_ADDED_TOKENS.map((t, i) => ({
      id: v.special[t.text], content: t.text, single_word: false, lstrip: false, rstrip: false, normalized: false, special: i < firstNonSpecial,
    })),
    normalizer: { type: 'NFC' },
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: QWEN2_SPLIT_REGEX }, behavior: 'Isolated', invert: false },
        BYTE_LEVEL,
      ],
    },
    post_processor: BYTE_LEVEL,
    decoder: BYTE_LEVEL,
    model: {
      type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '', fuse_unk: false,
      byte_fallback: false, ignore_merges: false, vocab, merges: v.merges.map((m) => m.split(' ')),
    },
  };
}

/** tokenizer_config.json of Qwen2.5-VL (the parts the converter and transformers read). */
export function tokenizerConfigJson(chatTemplate: string): Json {
  return {
    add_bos_token: false,
    add_prefix_space: false,
    bos_token: null,
    chat_template: chatTemplate,
    clean_up_tokenization_spaces: false,
    eos_token: '<|im_end|>',
    errors: 'replace',
    model_max_length: 131072,
    pad_token: '<|endoftext|>',
    split_special_tokens: false,
    tokenizer_class: 'Qwen2Tokenizer',
    unk_token: null,
  };
}

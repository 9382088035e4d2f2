// Reads a Hugging Face Qwen2.5-VL model folder (a download of internlm/CapRL-3B, or a Hub cache
// snapshot) and checks everything the conversion needs before a byte is written:
//   config.json, preprocessor_config.json, tokenizer.json (+ tokenizer_config.json,
//   generation_config.json), the chat template (tokenizer_config.json's chat_template, else
//   chat_template.jinja, else chat_template.json, as llama.cpp's converter looks), and the
//   safetensors weights (model.safetensors.index.json's weight_map, or every *.safetensors).
// Every error names the file and what is wrong with it.

import { createHash } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { QWEN2_VL_CHAT_TEMPLATE } from '../model/chat-template.js';
import type { ModelShape } from '../model/presets.js';
import { checkArchitecture, shapeFromHfConfig, textHparams, ConfigError } from './hf-config.js';
import { vocabFromHf, TokenizerError, type HfVocab } from './hf-tokenizer.js';
import { readSafetensorsHeader, CheckpointError, type SafetensorsHeader, type SafetensorsTensor } from './safetensors.js';

/** A model folder that cannot be converted; the message names the folder's file and the problem. */
export class ModelFolderError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ModelFolderError';
  }
}

type Json = Record<string, unknown>;

export interface HfTensorRef extends SafetensorsTensor {
  /** File name inside the folder */
  file: string;
  path: string;
}

export interface HfFolder {
  dir: string;
  config: Json;
  shape: ModelShape;
  vocab: HfVocab;
  chatTemplate: string;
  /** Where the chat template came from (a file name, or "built-in" when the folder has none) */
  chatTemplateSource: string;
  /** Every tensor of the checkpoint by its name as stored */
  tensors: Map<string, HfTensorRef>;
  files: SafetensorsHeader[];
  /** sha256 over the small files, the safetensors headers and sizes: changes when the model does */
  contentHash: string;
}

async function readJson(dir: string, file: string, required: true): Promise<Json>;
async function readJson(dir: string, file: string, required: false): Promise<Json | undefined>;
async function readJson(dir: string, file: string, required: boolean): Promise<Json | undefined> {
  const p = join(dir, file);
  if (!existsSync(p)) {
    if (required) throw new ModelFolderError(`${file} is missing in ${dir}`);
    return undefined;
  }
  const text = await readFile(p, 'utf8');
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ModelFolderError(`${file} in ${dir} is not valid JSON: ${(e as Error).message}`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new ModelFolderError(`${file} in ${dir} is not a JSON object`);
  return v as Json;
}

/** The chat template, looked up where llama.cpp's converter looks. */
async function chatTemplateOf(dir: string, tokenizerConfig: Json | undefined): Promise<{ template: string; source: string } | undefined> {
  const pick = (v: unknown): string | undefined => {
    if (typeof v === 'string') return v;
    if (Array.isArray(v)) {
      const d = (v as Json[]).find((e) => e?.name === 'default') ?? (v as Json[])[0];
      return typeof d?.template === 'string' ? d.template : undefined;
    }
    return undefined;
  };
  const fromConfig = pick(tokenizerConfig?.chat_template);
  if (fromConfig) return { template: fromConfig, source: 'tokenizer_config.json' };
  if (existsSync(join(dir, 'chat_template.jinja'))) return { template: await readFile(join(dir, 'chat_template.jinja'), 'utf8'), source: 'chat_template.jinja' };
  const json = await readJson(dir, 'chat_template.json', false);
  const fromJson = pick(json?.chat_template);
  return fromJson ? { template: fromJson, source: 'chat_template.json' } : undefined;
}

/** The safetensors files of the folder and every tensor in them, checked against the index. */
async function readWeights(dir: string): Promise<{ files: SafetensorsHeader[]; tensors: Map<string, HfTensorRef>; index?: Json }> {
  const indexFile = 'model.safetensors.index.json';
  const index = await readJson(dir, indexFile, false);
  let names: string[];
  let weightMap: Record<string, string> | undefined;
  if (index) {
    const wm = index.weight_map;
    if (!wm || typeof wm !== 'object' || Array.isArray(wm)) throw new ModelFolderError(`${indexFile} has no weight_map object`);
    weightMap = wm as Record<string, string>;
    names = [...new Set(Object.values(weightMap))].sort();
    for (const f of names) {
      if (typeof f !== 'string' || f.includes('..') || f.startsWith('/')) throw new ModelFolderError(`${indexFile} names a bad file ${JSON.stringify(f)}`);
      if (!existsSync(join(dir, f))) throw new ModelFolderError(`${f} (listed in ${indexFile}) is missing in ${dir}`);
    }
  } else {
    names = (await readdir(dir)).filter((f) => f.endsWith('.safetensors')).sort();
    if (names.length === 0) {
      const bins = (await readdir(dir)).filter((f) => f.endsWith('.bin') || f.endsWith('.pt'));
      throw new ModelFolderError(`no *.safetensors weights in ${dir}${bins.length ? ` (${bins.join(', ')}: PyTorch pickles are not supported; use the safetensors files)` : ''}`);
    }
  }
  const files: SafetensorsHeader[] = [];
  const tensors = new Map<string, HfTensorRef>();
  for (const f of names) {
    let h: SafetensorsHeader;
    try {
      h = await readSafetensorsHeader(join(dir, f));
    } catch (e) {
      if (e instanceof CheckpointError) throw new ModelFolderError(`${e.message} (in ${dir})`);
      throw e;
    }
    files.push(h);
    for (const t of h.tensors.values()) {
      const prev = tensors.get(t.name);
      if (prev) throw new ModelFolderError(`tensor ${t.name} is in both ${prev.file} and ${f}`);
      tensors.set(t.name, { ...t, file: f, path: h.path });
    }
  }
  if (weightMap) {
    for (const [name, f] of Object.entries(weightMap)) {
      const t = tensors.get(name);
      if (!t) throw new ModelFolderError(`${indexFile} puts ${name} in ${f}, but ${f} has no such tensor (incomplete or mismatched download?)`);
      if (t.file !== f) throw new ModelFolderError(`${indexFile} puts ${name} in ${f}, but it is in ${t.file}`);
    }
    for (const t of tensors.values()) {
      if (!(t.name in weightMap)) throw new ModelFolderError(`${t.file} holds ${t.name}, which ${indexFile} does not list`);
    }
  }
  return { files, tensors, index };
}

/** Read and check a model folder. Nothing is converted; tensor data is not read. */
export async function readHfFolder(dir: string): Promise<HfFolder> {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new ModelFolderError(`${dir} is not a folder`);
  if (!existsSync(join(dir, 'config.json'))) {
    throw new ModelFolderError(`${dir} is not a Hugging Face model folder: config.json is missing`);
  }
  const wrap = <T>(f: () => T): T => {
    try {
      return f();
    } catch (e) {
      if (e instanceof ConfigError || e instanceof TokenizerError) throw new ModelFolderError(`${(e as Error).message} (in ${dir})`, { cause: e });
      throw e;
    }
  };
  const config = await readJson(dir, 'config.json', true);
  wrap(() => checkArchitecture(config)); // first: nothing else matters for another architecture
  const preprocessor = await readJson(dir, 'preprocessor_config.json', true);
  const tokenizer = await readJson(dir, 'tokenizer.json', true);
  const tokenizerConfig = await readJson(dir, 'tokenizer_config.json', false);
  const generationConfig = await readJson(dir, 'generation_config.json', false);
  const vocabSize = textHparams(config).vocab_size;
  if (typeof vocabSize !== 'number') throw new ModelFolderError(`config.json has no vocab_size (in ${dir})`);
  const vocab = wrap(() => vocabFromHf({ tokenizer, tokenizerConfig, config, generationConfig, vocabSize }));
  const shape = wrap(() => shapeFromHfConfig(config, preprocessor, vocab.nBpe));
  const { files, tensors, index } = await readWeights(dir);
  const hasLmHead = [...tensors.keys()].some((n) => /^(model\.)?lm_head\.weight$/.test(n));
  if (textHparams(config).tie_word_embeddings === undefined) shape.text.tiedEmbeddings = !hasLmHead;
  const tpl = await chatTemplateOf(dir, tokenizerConfig);

  const h = createHash('sha256');
  const add = (label: string, data: string | Buffer) => h.update(`${label}\0${data.length}\0`).update(data);
  add('config', JSON.stringify(config));
  add('preprocessor', JSON.stringify(preprocessor));
  add('tokenizer', JSON.stringify(tokenizer));
  add('tokenizer_config', JSON.stringify(tokenizerConfig ?? null));
  add('generation_config', JSON.stringify(generationConfig ?? null));
  add('index', JSON.stringify(index ?? null));
  add('chat_template', tpl?.template ?? '');
  for (const f of files) {
    add('file', `${basename(f.path)} ${f.size}`);
    add('header', f.raw);
  }
  return {
    dir,
    config,
    shape,
    vocab,
    chatTemplate: tpl?.template ?? QWEN2_VL_CHAT_TEMPLATE,
    chatTemplateSource: tpl?.source ?? 'built-in',
    tensors,
    files,
    contentHash: h.digest('hex'),
  };
}

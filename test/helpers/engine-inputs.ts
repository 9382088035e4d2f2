// Inputs for tests that drive the engine directly: greedy sampling that runs to max_tokens, and
// a deterministic pixel pattern as an image (a different seed, a different image).
import type { EngineImage, SamplingParams } from '../../src/engine/engine.js';

export const greedy = (maxTokens: number): SamplingParams => ({
  temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
  seed: -1, maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], logprobs: -1,
});

export function patternImage(size: number, seed: number): EngineImage {
  const rgb = Buffer.alloc(size * size * 3);
  for (let i = 0; i < rgb.length; i++) rgb[i] = (i * seed + (i >> 7)) & 255;
  return { width: size, height: size, rgb };
}

// Sampling for engine benchmarks and tests: greedy, running to max_tokens (the end-of-generation
// token ignored), so every request does the same amount of work.
import type { SamplingParams } from '../src/engine/engine.js';

export const greedy = (maxTokens: number, over: Partial<SamplingParams> = {}): SamplingParams => ({
  temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
  seed: -1, maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], logprobs: -1, ...over,
});

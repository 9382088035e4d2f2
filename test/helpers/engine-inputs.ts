// Inputs for tests that drive the engine directly: greedy sampling that runs to max_tokens (shared
// with the engine benchmarks), and a deterministic pixel pattern as an image (a different seed, a
// different image).
import type { EngineImage } from '../../src/engine/engine.js';

export { greedy } from '../../bench/sampling.js';

export function patternImage(size: number, seed: number): EngineImage {
  const rgb = Buffer.alloc(size * size * 3);
  for (let i = 0; i < rgb.length; i++) rgb[i] = (i * seed + (i >> 7)) & 255;
  return { width: size, height: size, rgb };
}

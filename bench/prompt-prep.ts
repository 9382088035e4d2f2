// Prompt preparation cost of image requests: the engine in-process (no HTTP), bursts of --burst
// requests, each with its own --size image, one output token. Prints the time from submission to
// admission of the burst's first and last requests (the prep thread's work: tokenizing, and with
// llama.cpp's clip also resizing and normalizing every image in mtmd; a burst is admitted together
// unless preparing it takes over 50 ms) for each vision encoder, side by side.
// With ours (--vision-encoder caprl) mtmd plans the tokens from a placeholder of the image's size.
//
//   node dist/bench/prompt-prep.js --model M.gguf --mmproj P.gguf [--size 1036] [--burst 8] [--rounds 5]
import { parseArgs } from 'node:util';
import { Engine, type EngineImage } from '../src/engine/engine.js';
import type { VisionEncoderKind } from '../src/engine/native-types.js';
import { syntheticRgb } from './images.js';
import { greedy } from './sampling.js';
import { percentile } from './stats.js';

async function burstMs(model: string, mmproj: string, encoder: VisionEncoderKind, size: number, burst: number, rounds: number): Promise<{ first: number[]; last: number[] }> {
  const engine = new Engine({
    model, mmproj, nCtx: burst * 2048, maxModelLen: 2048, maxSeqs: burst, nBatch: 2048, logLevel: 'error',
    visionEncoder: encoder, imageCacheBytes: 0,
  });
  const prompt = `<|im_start|>user\n<|vision_start|>${engine.info.mediaMarker}<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n`;
  const sampling = greedy(1);
  const out = { first: [] as number[], last: [] as number[] };
  try {
    for (let r = 0; r < rounds; r++) {
      const images: EngineImage[] = Array.from({ length: burst }, (_, i) => ({ width: size, height: size, rgb: syntheticRgb(size, size, r * burst + i + 1) }));
      const queued: number[] = [];
      await Promise.all(images.map(async (image) => {
        for await (const ev of engine.generate({ prompt, images: [image], sampling })) if (ev.finish?.timings) queued.push(ev.finish.timings.queued);
      }));
      out.first.push(Math.min(...queued) * 1000);
      out.last.push(Math.max(...queued) * 1000);
    }
  } finally {
    await engine.close();
  }
  return out;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      model: { type: 'string' }, mmproj: { type: 'string' },
      size: { type: 'string', default: '1036' }, burst: { type: 'string', default: '8' }, rounds: { type: 'string', default: '5' },
    },
  });
  if (!values.model || !values.mmproj) throw new Error('--model and --mmproj are required');
  const [size, burst, rounds] = [Number(values.size), Number(values.burst), Number(values.rounds)];
  console.log(`| vision encoder | burst of ${burst} ${size}x${size} images, submission -> first admitted, ms | -> last admitted, ms | per image |`);
  console.log('| --- | ---: | ---: | ---: |');
  const medians: number[] = [];
  for (const encoder of ['llama.cpp', 'caprl'] as const) {
    const ms = await burstMs(values.model, values.mmproj, encoder, size, burst, rounds);
    const [first, last] = [percentile(ms.first, 50), percentile(ms.last, 50)];
    medians.push(last);
    console.log(`| ${encoder} | ${first.toFixed(1)} | ${last.toFixed(1)} | ${(last / burst).toFixed(1)} |`);
  }
  console.log(`| **caprl / llama.cpp** | | ${(medians[1]! / medians[0]!).toFixed(2)}x | |`);
  console.log(`(medians of ${rounds} rounds)`);
}

main().catch((err) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});

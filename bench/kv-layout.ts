// Decode step cost by KV layout: the engine in-process (no HTTP), c concurrent greedy requests of
// --tokens tokens each, with one KV pool shared by all sequences vs a KV stream per sequence
// (chosen when the cache holds max-num-seqs x max-model-len). Prints ms per engine step and
// tokens/s for each; the ratio is what attending over only a sequence's own cells saves.
//
//   node dist/bench/kv-layout.js --model M.gguf [--concurrency 8,32,64] [--tokens 128] [--threads 1]
import { parseArgs } from 'node:util';
import { Engine } from '../src/engine/engine.js';
import { greedy } from './sampling.js';

interface Row {
  layout: string;
  concurrency: number;
  msPerStep: number;
  tokensPerSecond: number;
}

async function measure(model: string, perSequence: boolean, c: number, tokens: number, threads: number): Promise<Row> {
  const maxSeqs = 64;
  const maxModelLen = 1024;
  // The same cells either way; only --max-model-len (and so the layout) differs.
  const engine = new Engine({
    model, nCtx: maxSeqs * maxModelLen, maxSeqs, nBatch: 2048, nThreads: threads, logLevel: 'error',
    ...(perSequence ? { maxModelLen } : {}),
  });
  const sampling = greedy(tokens);
  try {
    const steps0 = engine.stats().steps;
    const t0 = performance.now();
    await Promise.all(Array.from({ length: c }, async (_, i) => {
      for await (const _ev of engine.generate({ prompt: `request ${i}: describe the picture`, images: [], n: 1, sampling })) { /* drain */ }
    }));
    const ms = performance.now() - t0;
    const steps = engine.stats().steps - steps0;
    return { layout: engine.info.kvCache.layout, concurrency: c, msPerStep: ms / steps, tokensPerSecond: (c * tokens) / (ms / 1000) };
  } finally {
    await engine.close();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      model: { type: 'string' },
      concurrency: { type: 'string', default: '8,32,64' },
      tokens: { type: 'string', default: '128' },
      threads: { type: 'string', default: '1' },
    },
  });
  if (!values.model) throw new Error('--model is required');
  const levels = values.concurrency!.split(',').map(Number);
  console.log('| concurrency | unified: ms/step | per-sequence: ms/step | unified tok/s | per-sequence tok/s | per-sequence / unified |');
  console.log('|---|---|---|---|---|---|');
  for (const c of levels) {
    const u = await measure(values.model, false, c, Number(values.tokens), Number(values.threads));
    const p = await measure(values.model, true, c, Number(values.tokens), Number(values.threads));
    if (u.layout !== 'unified' || p.layout !== 'per-sequence') throw new Error(`layouts: ${u.layout}, ${p.layout}`);
    console.log(`| ${c} | ${u.msPerStep.toFixed(2)} | ${p.msPerStep.toFixed(2)} | ${u.tokensPerSecond.toFixed(0)} | ${p.tokensPerSecond.toFixed(0)} | ${(p.tokensPerSecond / u.tokensPerSecond).toFixed(2)}x |`);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});

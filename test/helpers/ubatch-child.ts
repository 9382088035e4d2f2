// Child of kv-layout.test.ts: with a KV stream per sequence, four requests start together and the
// first and last end early, leaving holes in the sequence ids (the survivor moved down then comes
// after the other in admission order). llama.cpp's batch debug output (LLAMA_BATCH_DEBUG,
// set by the parent, at log level debug) goes to stderr between BEGIN and END markers; stdout gets
// the tokens of the two long requests, alone and together, as JSON.
import { Engine } from '../../src/engine/engine.js';
import { greedy } from './engine-inputs.js';

const [model] = process.argv.slice(2) as [string];
const engine = new Engine({ model, nCtx: 4 * 256, maxModelLen: 256, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'debug' });
// Prompts of one length: the first step prefills all four as one ubatch.
const prompt = (i: number) => `<|im_start|>user\nsequence ${i}<|im_end|>\n<|im_start|>assistant\n`;
const run = async (i: number, maxTokens: number) => {
  const tokens: number[] = [];
  for await (const ev of engine.generate({ prompt: prompt(i), images: [], sampling: greedy(maxTokens) })) tokens.push(...ev.tokens);
  return tokens;
};
const alone = [await run(1, 24), await run(2, 24)];
process.stderr.write('\nBEGIN\n');
const together = await Promise.all([run(0, 4), run(1, 24), run(2, 24), run(3, 4)]);
process.stderr.write('\nEND\n');
const layout = engine.info.kvCache.layout;
const moves = engine.stats().streamMoves;
await engine.close();
process.stdout.write(JSON.stringify({ layout, moves, alone, together: [together[1], together[2]] }));

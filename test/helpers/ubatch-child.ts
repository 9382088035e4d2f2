// Child of kv-layout.test.ts, with a KV stream per sequence. llama.cpp's batch debug output
// (LLAMA_BATCH_DEBUG, set by the parent, at log level debug) goes to stderr between BEGIN and END
// markers; stdout gets JSON.
//   text MODEL: twice, four requests start together and two end early, leaving holes in the
//     sequence ids: first between the survivors, then below them (the survivor moved down then
//     comes after the other in admission order); stdout: the long requests' tokens, alone and together.
//   image MODEL MMPROJ: one image request (224x224: 64 rows) alone; stdout: its prompt tokens.
import { Engine } from '../../src/engine/engine.js';
import { greedy, patternImage } from './engine-inputs.js';

const [mode, model, mmproj] = process.argv.slice(2) as ['text' | 'image', string, string | undefined];
const engine = new Engine({ model, mmproj, nCtx: 4 * 256, maxModelLen: 256, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'debug' });
const layout = engine.info.kvCache.layout;
if (mode === 'image') {
  const prompt = `<|im_start|>user\n<|vision_start|>${engine.info.mediaMarker}<|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n`;
  let promptTokens = 0;
  process.stderr.write('\nBEGIN\n');
  for await (const ev of engine.generate({ prompt, images: [patternImage(224, 3)], sampling: greedy(4) })) {
    if (ev.finish) promptTokens = ev.finish.promptTokens;
  }
  process.stderr.write('\nEND\n');
  await engine.close();
  process.stdout.write(JSON.stringify({ layout, promptTokens }));
} else {
  // Prompts of one length: the first step prefills all four as one ubatch.
  const prompt = (i: number) => `<|im_start|>user\nsequence ${i}<|im_end|>\n<|im_start|>assistant\n`;
  const run = async (i: number, maxTokens: number) => {
    const tokens: number[] = [];
    for await (const ev of engine.generate({ prompt: prompt(i), images: [], sampling: greedy(maxTokens) })) tokens.push(...ev.tokens);
    return tokens;
  };
  const alone = [await run(1, 24), await run(2, 24)];
  process.stderr.write('\nBEGIN\n');
  // Survivors 1 and 3: a hole between them. Survivors 2 and 3: the last moves below the other.
  const first = await Promise.all([run(1, 24), run(0, 4), run(2, 24), run(3, 4)]);
  const second = await Promise.all([run(0, 4), run(1, 24), run(2, 24), run(3, 4)]);
  process.stderr.write('\nEND\n');
  const moves = engine.stats().streamMoves;
  await engine.close();
  process.stdout.write(JSON.stringify({ layout, moves, alone, together: [first[0], first[2], second[1], second[2]] }));
}

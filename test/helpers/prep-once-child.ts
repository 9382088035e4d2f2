// Child of engine-prompt-prep.test.ts: a 512-cell pool held by a long text request, then an image
// request that cannot be admitted until it ends (prepared meanwhile). Prints the finish reasons
// as JSON; the engine logs errors to stderr, which the parent reads.
import { Engine } from '../../src/engine/engine.js';
import { greedy, patternImage } from './engine-inputs.js';

const [model, mmproj] = process.argv.slice(2) as [string, string];

const engine = new Engine({ model, mmproj, nCtx: 512, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
const chat = (text: string) => `<|im_start|>user\n${text}<|im_end|>\n<|im_start|>assistant\n`;
// ~250 prompt cells + its output: a 448x448 image (256 rows) cannot join until it ends.
const holder = engine.generate({ prompt: chat('word '.repeat(80)), images: [], sampling: greedy(60) });
const image = engine.generate({ prompt: chat(`${engine.info.mediaMarker}Describe.`), images: [patternImage(448, 29)], sampling: greedy(4) });
const reasons: string[] = [];
let waited = false;
const read = async (gen: typeof holder, isHolder: boolean) => {
  for await (const ev of gen) {
    if (isHolder && ev.tokens.length > 0 && engine.stats().waiting === 1) waited = true;
    if (ev.finish) reasons.push(ev.finish.reason);
  }
};
await Promise.all([read(holder, true), read(image, false)]);
await engine.close();
process.stdout.write(JSON.stringify({ reasons, waited }));

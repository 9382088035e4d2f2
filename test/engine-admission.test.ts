// The engine checks each prompt once, where its KV cells are known (images included), and says so
// before any token (Generation.admission); a client fault it finds ends the request with a typed
// error (errorKind 'client', the field at fault, OpenAI's code), never as an internal error.
import t from 'tap';
import { Engine } from '../src/engine/engine.js';
import { greedy, patternImage } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

const chat = (text: string) => `<|im_start|>user\n${text}<|im_end|>\n<|im_start|>assistant\n`;

t.test('admission and client faults', async (t) => {
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, nCtx: 4096, maxModelLen: 512, maxSeqs: 4, nBatch: 512, logLevel: 'none' });
  t.teardown(() => engine.close());
  t.equal(engine.info.maxModelLen, 512, 'info.maxModelLen is the per-sequence limit');
  const m = engine.info.mediaMarker;

  t.test('accepted: the prompt\'s cells with its image, and the rest of the context without max_tokens', async (t) => {
    const gen = engine.generate({ prompt: chat(`${m}Describe.`), images: [patternImage(112, 1)], sampling: greedy(-1) });
    const a = await gen.admission;
    gen.cancel();
    if (!a.accepted) throw new Error(`refused: ${a.finish.reason} ${a.finish.error}`);
    for await (const ev of gen) void ev;
    // 112x112 -> 4x4 merged tokens; the text around it is tokenized by the engine.
    t.ok(a.promptTokens > 16, `${a.promptTokens} prompt tokens, the image's 16 among them`);
    t.equal(a.maxTokens, 512 - a.promptTokens, 'max_tokens unset: the rest of the context');
  });

  t.test('the same prompt\'s count equals what its finish reports', async (t) => {
    const gen = engine.generate({ prompt: chat(`${m}Describe.`), images: [patternImage(112, 2)], sampling: greedy(3) });
    let finishTokens = 0;
    for await (const ev of gen) if (ev.finish) finishTokens = ev.finish.promptTokens;
    const a = await gen.admission;
    t.ok(a.accepted && a.promptTokens === finishTokens && a.maxTokens === 3, 'accepted with 3 tokens, the finish\'s prompt count');
  });

  const refused = async (prompt: string, images: ReturnType<typeof patternImage>[], maxTokens: number, n = 1) => {
    const gen = engine.generate({ prompt, images, n, sampling: greedy(maxTokens) });
    const a = await gen.admission;
    const finishes = [];
    for await (const ev of gen) if (ev.finish) finishes.push(ev.finish);
    return { a, finishes };
  };

  t.test('prompt + max_tokens over the context: a client fault on max_tokens', async (t) => {
    const { a, finishes } = await refused(chat('Describe.'), [], 600);
    t.notOk(a.accepted, 'refused before any token');
    const f = finishes[0]!;
    t.equal(f.reason, 'error');
    t.equal(f.errorKind, 'client');
    t.equal(f.errorParam, 'max_tokens');
    t.equal(f.errorCode, 'context_length_exceeded');
    t.match(f.error, /^This model's maximum context length is 512 tokens\. However, you requested \d+ tokens \(\d+ in the messages, 600 in the completion\)\. Please reduce the length of the messages or completion\.$/);
  });

  t.test('an image whose tokens fill the context: a client fault on the prompt', async (t) => {
    const { a, finishes } = await refused(chat(`${m}Describe.`), [patternImage(700, 3)], 4);
    t.notOk(a.accepted);
    t.equal(finishes[0]!.errorKind, 'client');
    t.equal(finishes[0]!.errorParam, 'prompt');
    t.match(finishes[0]!.error, /However, you requested \d+ tokens in the messages, Please reduce the length of the messages\./);
  });

  t.test('an image marker without its image: a client fault', async (t) => {
    const { a, finishes } = await refused(chat(`${m}${m}Describe.`), [patternImage(56, 4)], 4);
    t.notOk(a.accepted);
    t.equal(finishes[0]!.errorKind, 'client');
    t.match(finishes[0]!.error, /different number of image markers \(2\) than images \(1 images\)/);
  });

  t.test('n above the sequences: a client fault on n, for every choice', async (t) => {
    const { a, finishes } = await refused(chat('Describe.'), [], 4, 5);
    t.notOk(a.accepted);
    t.equal(finishes.length, 5);
    t.ok(finishes.every((f) => f.errorKind === 'client' && f.errorParam === 'n'));
  });
});

// The CapRL workflows' plumbing without a model: globbing, sharding, the crash-safe JSONL
// output (torn lines, resume keys, error-record retries), input lists, question parsing and
// rendering, answer-letter parsing, the reward / Prism arithmetic on fixed strings, progress
// lines, the bounded pool, the endpoint pool (retries, 4xx records, failover) and run-batch lines.
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { EndpointError, EndpointPool, chatCompletionsUrl } from '../src/workflows/endpoints.js';
import { RecordError } from '../src/workflows/errors.js';
import { expandGlob, globBase, globToRegExp, walkFiles } from '../src/workflows/glob.js';
import { loadImage, openInputSource, parseListLine, type InputRecord } from '../src/workflows/input-sources.js';
import { JsonlAppender, readJsonl } from '../src/workflows/jsonl-writer.js';
import { runPool } from '../src/workflows/pool.js';
import { RunProgress, formatDuration } from '../src/workflows/progress.js';
import {
  CANNOT_ANSWER, QuestionFormatError, bestOfN, meanAccuracy, parseAnswerLetter, parseQuestion, renderQuestion,
  shuffleQuestion, summarizeScores, type MultipleChoice,
} from '../src/workflows/qa.js';
import { aggregateRewards, planAsks, scoreReply, type AnswerDetail } from '../src/workflows/qa-reward.js';
import { BatchInputError, batchErrorOutput, batchOutput, parseBatchLine } from '../src/entrypoints/openai/run-batch.js';
import { inShard, parseShard, shardOf, ShardSpecError } from '../src/workflows/shard.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-wf-units-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

/** tap's throws/rejects take a class or a pattern; these take a predicate. */
async function rejectsWith(t: Test, p: Promise<unknown>, pred: (e: unknown) => boolean, msg: string): Promise<void> {
  try {
    await p;
  } catch (e) {
    t.ok(pred(e), `${msg}: ${e instanceof Error ? e.message : String(e)}`);
    return;
  }
  t.fail(`${msg}: expected a rejection`);
}

function throwsWith(t: Test, f: () => unknown, pred: (e: unknown) => boolean, msg: string): void {
  try {
    f();
  } catch (e) {
    t.ok(pred(e), `${msg}: ${e instanceof Error ? e.message : String(e)}`);
    return;
  }
  t.fail(`${msg}: expected a throw`);
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

t.test('glob patterns', async (t) => {
  const cases: [string, string, boolean][] = [
    ['*.png', 'a.png', true],
    ['*.png', 'd/a.png', false],
    ['**/*.png', 'a.png', true],
    ['**/*.png', 'd/e/a.png', true],
    ['d/**/*.png', 'd/a.png', true],
    ['d/**/*.png', 'x/d/a.png', false],
    ['img?.jpg', 'img1.jpg', true],
    ['img?.jpg', 'img10.jpg', false],
    ['[ab].png', 'b.png', true],
    ['[!ab].png', 'b.png', false],
    ['[!ab].png', 'c.png', true],
    ['{cats,dogs}/*.gif', 'dogs/x.gif', true],
    ['{cats,dogs}/*.gif', 'birds/x.gif', false],
    ['a.b', 'aXb', false],
    ['**', 'x/y/z', true],
  ];
  for (const [pattern, p, want] of cases) t.equal(globToRegExp(pattern).test(p), want, `${pattern} ~ ${p}`);
  t.same(globBase('data/**/*.jpg'), { base: 'data', rest: '**/*.jpg' });
  t.same(globBase('*.jpg'), { base: '', rest: '*.jpg' });

  const root = path.join(tmp, 'globtree');
  for (const f of ['b.png', 'a.jpg', 'sub/c.png', 'sub/deep/d.png', 'sub/e.txt']) {
    mkdirSync(path.dirname(path.join(root, f)), { recursive: true });
    writeFileSync(path.join(root, f), 'x');
  }
  t.same(await collect(walkFiles(root)), ['a.jpg', 'b.png', 'sub/c.png', 'sub/deep/d.png', 'sub/e.txt'], 'sorted, depth-first');
  t.same(await collect(expandGlob('globtree/**/*.png', tmp)), ['globtree/b.png', 'globtree/sub/c.png', 'globtree/sub/deep/d.png']);
  t.same(await collect(expandGlob('globtree/sub/*.png', tmp)), ['globtree/sub/c.png']);
  t.same(await collect(expandGlob('nothing-here/*.png', tmp)), []);
});

t.test('--shard i/N: a stable partition', async (t) => {
  t.same(parseShard('1/4'), { index: 1, count: 4 });
  t.same(parseShard(' 0 / 1 '), { index: 0, count: 1 });
  for (const bad of ['4/4', '1', 'a/b', '0/0', '-1/3']) t.throws(() => parseShard(bad), ShardSpecError, bad);
  const ids = Array.from({ length: 1000 }, (_, i) => `images/${i}.jpg`);
  for (const N of [1, 2, 3, 7]) {
    const owners = ids.map((id) => [...Array(N).keys()].filter((i) => inShard(id, { index: i, count: N })));
    t.ok(owners.every((o) => o.length === 1), `N=${N}: every id in exactly one shard`);
    if (N > 1) {
      const sizes = [...Array(N).keys()].map((i) => owners.filter((o) => o[0] === i).length);
      t.ok(sizes.every((s) => s > 1000 / N / 2), `N=${N}: balanced (${sizes.join(', ')})`);
    }
  }
  // The hash is part of the contract between machines of a sharded run: it must never change.
  const sha = (s: string) => createHash('sha256').update(s, 'utf8').digest('hex');
  for (const id of ['a', 'images/0.jpg', 'ünïcode/ß.png']) {
    t.equal(shardOf(id, 1000), Number(BigInt(`0x${sha(id).slice(0, 16)}`) % 1000n), `first 8 bytes of SHA-256 mod N: ${id}`);
  }
  t.same(['a', 'b', 'c', 'd', 'images/0.jpg'].map((id) => shardOf(id, 4)), [2, 2, 2, 1, 0], 'pinned values');
});

t.test('JSONL output: resume keys, torn last line, corrupt lines, dropped errors', async (t) => {
  const file = path.join(tmp, 'out.jsonl');
  const key = (r: Record<string, unknown>) => (typeof r.id === 'string' ? r.id : undefined);
  {
    const { appender, resume } = await JsonlAppender.open(file, { key, fsync: 'always' });
    t.equal(resume.records, 0);
    appender.append({ id: 'a', caption: 'x', error: null });
    appender.append({ id: 'b', caption: null, error: 'bad image' });
    appender.append({ id: 'c', caption: 'ünï 💡', error: null });
    appender.close();
  }
  t.equal(readFileSync(file, 'utf8').split('\n').length, 4, 'three lines, each ending in a newline');

  // A crash mid-write: the last line has no newline.
  appendFileSync(file, '{"id":"d","capt');
  {
    const { appender, resume } = await JsonlAppender.open(file, { key });
    t.same([...resume.keys].sort(), ['a', 'b', 'c']);
    t.equal(resume.tornBytes, '{"id":"d","capt'.length, 'the torn tail is cut');
    t.equal(resume.corruptLines, 0);
    appender.append({ id: 'd', caption: 'y', error: null });
    appender.close();
  }
  const lines = readFileSync(file, 'utf8').trimEnd().split('\n');
  t.same(lines.map((l) => JSON.parse(l).id), ['a', 'b', 'c', 'd'], 'no torn line left behind');

  // A last line that is complete but not JSON (e.g. zeros after a power cut) is cut too.
  appendFileSync(file, '\0\0\0\0\n');
  {
    const { appender, resume } = await JsonlAppender.open(file, { key });
    t.equal(resume.tornBytes, 5);
    t.equal(resume.records, 4);
    appender.close();
  }
  // A bad line in the middle is left alone and counted; the records after it still count.
  appendFileSync(file, 'garbage\n{"id":"e","error":null}\n');
  {
    const { appender, resume } = await JsonlAppender.open(file, { key });
    t.equal(resume.corruptLines, 1);
    t.equal(resume.tornBytes, 0);
    t.ok(resume.keys.has('e'));
    appender.close();
  }
  // --retry-errors: error records are removed from the file and not done.
  {
    const { appender, resume } = await JsonlAppender.open(file, { key, drop: (r) => r.error !== null && r.error !== undefined });
    t.equal(resume.dropped, 1);
    t.notOk(resume.keys.has('b'));
    appender.close();
  }
  const after = readFileSync(file, 'utf8');
  t.notMatch(after, /bad image/);
  t.match(after, /garbage/, 'other lines kept as they were');
  const ids: string[] = [];
  await readJsonl(file, (r) => ids.push(String(r.id)));
  t.same(ids, ['a', 'c', 'd', 'e']);
});

t.test('JSONL output: lines across read-chunk boundaries', async (t) => {
  const file = path.join(tmp, 'big.jsonl');
  const { appender } = await JsonlAppender.open(file, { key: (r) => r.id as string, fsync: 'never' });
  const big = 'x'.repeat(300_000);
  for (let i = 0; i < 12; i++) appender.append({ id: `r${i}`, caption: big + i });
  appender.close();
  appendFileSync(file, `{"id":"torn","caption":"${big}`);
  const { appender: a2, resume } = await JsonlAppender.open(file, { key: (r) => r.id as string });
  a2.close();
  t.equal(resume.records, 12);
  t.ok(resume.tornBytes > 300_000);
  const expected = Array.from({ length: 12 }, (_, i) => JSON.stringify({ id: `r${i}`, caption: big + i }).length + 1).reduce((a, b) => a + b, 0);
  t.equal(readFileSync(file).length, expected, 'exactly the complete lines remain');
});

t.test('input lists: lines, ids, prompts, error records', async (t) => {
  const root = path.join(tmp, 'lists');
  t.same(parseListLine('   ', 1, root, 'image'), null, 'blank lines are skipped');
  const plain = parseListLine('imgs/a.png', 2, root, 'image')!;
  t.same({ id: plain.id, image: plain.image, location: plain.location }, { id: 'imgs/a.png', image: 'imgs/a.png', location: path.join(root, 'imgs/a.png') });
  const str = parseListLine('"/abs/b.jpg"', 3, root, 'image')!;
  t.equal(str.location, '/abs/b.jpg');
  const obj = parseListLine('{"id": 7, "image_path": "c.webp", "prompt": "Describe briefly"}', 4, root, 'image')!;
  t.same({ id: obj.id, prompt: obj.prompt, location: obj.location }, { id: '7', prompt: 'Describe briefly', location: path.join(root, 'c.webp') });
  const url = parseListLine('{"url": "https://example.com/x.png"}', 5, root, 'image')!;
  t.same({ id: url.id, location: url.location }, { id: 'https://example.com/x.png', location: 'https://example.com/x.png' });
  const iu = parseListLine('{"image_url": {"url": "data:image/png;base64,AAAA"}}', 6, root, 'line')!;
  t.same({ id: iu.id, location: iu.location }, { id: 'line:6', location: 'data:image/png;base64,AAAA' }, 'idFrom line');
  const badJson = parseListLine('{"image": ', 7, root, 'image')!;
  t.equal(badJson.id, 'line:7');
  t.match(badJson.error, /line 7: not valid JSON/);
  const noImage = parseListLine('{"id": "q1", "question": "?"}', 8, root, 'image')!;
  t.equal(noImage.id, 'q1');
  t.match(noImage.error, /no image/);
  t.match(parseListLine('{"image": 5}', 9, root, 'image')!.error, /^line 9: no image/);
  t.equal(parseListLine('"[1,2]"', 10, root, 'image')!.image, '[1,2]');

  mkdirSync(root, { recursive: true });
  const list = path.join(root, 'list.jsonl');
  writeFileSync(list, 'a.png\n\n{"image": "b.png", "id": "B"}\nnot json {\n{"image": "sub/c.png"}'); // no final newline
  const src = await openInputSource(list);
  t.equal(src.kind, 'list');
  const recs: InputRecord[] = await collect(src.records());
  t.same(recs.map((r) => r.id), ['a.png', 'B', 'not json {', 'sub/c.png'], 'a bare line is a path; the last line needs no newline');
  const rooted = await collect((await openInputSource(list, { imageRoot: '/data' })).records());
  t.equal(rooted[0]!.location, '/data/a.png', '--image-root');
  t.equal((await collect(src.records())).length, 4, 'a source can be read twice');

  const folder = path.join(tmp, 'folder');
  for (const f of ['x.PNG', 'y.txt', 'n/z.jpeg', 'n/w.gif']) {
    mkdirSync(path.dirname(path.join(folder, f)), { recursive: true });
    writeFileSync(path.join(folder, f), 'x');
  }
  const fsrc = await openInputSource(folder);
  t.equal(fsrc.kind, 'folder');
  t.same((await collect(fsrc.records())).map((r) => r.id), ['n/w.gif', 'n/z.jpeg', 'x.PNG'], 'images only, ids relative to the folder');
  const gsrc = await openInputSource(path.join(folder, '**/*.{jpeg,gif}'));
  t.equal(gsrc.kind, 'glob');
  t.equal((await collect(gsrc.records())).length, 2);
  await t.rejects(openInputSource(path.join(tmp, 'missing-dir')), /input not found/);
});

t.test('loading images: formats and errors become RecordErrors', async (t) => {
  const png = await sharp({ create: { width: 8, height: 8, channels: 3, background: { r: 9, g: 9, b: 9 } } }).png().toBuffer();
  const good = path.join(tmp, 'good.png');
  writeFileSync(good, png);
  const r = await loadImage(good);
  t.equal(r.format, 'png');
  t.equal(r.bytes.length, png.length);
  t.equal((await loadImage(`data:image/png;base64,${png.toString('base64')}`)).format, 'png');
  const text = path.join(tmp, 'text.png');
  writeFileSync(text, 'hello, not an image');
  await rejectsWith(t, loadImage(text), (e: unknown) => e instanceof RecordError && e.code === 'unsupported_image_format', 'not an image');
  await rejectsWith(t, loadImage(path.join(tmp, 'nope.png')), (e: unknown) => e instanceof RecordError && e.code === 'local_media_not_found', 'missing');
  await rejectsWith(t, loadImage(good, { maxBytes: 10 }), (e: unknown) => e instanceof RecordError && e.code === 'image_too_large', 'too large');
  // http(s) images (a JSONL of URLs) go through the server's fetcher.
  const server = createServer((req, res) => {
    if (req.url === '/a.png') {
      res.writeHead(200, { 'content-type': 'image/png' });
      res.end(png);
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => server.close());
  const base = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  t.same((await loadImage(`${base}/a.png`)).bytes, png);
  await rejectsWith(t, loadImage(`${base}/missing.png`), (e: unknown) => e instanceof RecordError && e.code === 'image_fetch_failed' && /HTTP 404/.test(e.message), 'a 404');
});

const CAPRL_Q = 'What color is the dog?\n   - A) Brown\n   - B) White\n   - C) Black\n   - D) Gray';

t.test('questions: parsing the accepted forms', async (t) => {
  t.same(parseQuestion({ question: CAPRL_Q, answer: 'C' }), { stem: 'What color is the dog?', options: ['Brown', 'White', 'Black', 'Gray'], answer: 2 });
  t.same(parseQuestion({ question: 'How many?\nA. one\nB. two\nC. three', answer: '(B)' }).answer, 1);
  t.same(parseQuestion({ question: 'Q?\n(A) x\n(B) y', answer: 'b' }).answer, 1, 'a lone lowercase letter');
  t.same(parseQuestion({ question: 'Q?\n- A) long option\n  wrapped here\n- B) y', answer: 'A' }).options, ['long option wrapped here', 'y']);
  t.same(parseQuestion({ question: 'Q?', options: ['cat', 'dog'], answer: 'dog' }), { stem: 'Q?', options: ['cat', 'dog'], answer: 1 }, 'answer by text');
  t.same(parseQuestion({ question: 'Q?', options: ['A. cat', 'B. dog'], answer: 'A' }).options, ['cat', 'dog'], 'labelled list');
  t.same(parseQuestion({ question: 'Q?', options: { B: 'dog', A: 'cat' }, answer: 'B' }), { stem: 'Q?', options: ['cat', 'dog'], answer: 1 });
  // CapRL data may carry the "can not answer" option itself: dropped (it comes back last when rendered).
  const withE = parseQuestion({ question: `${CAPRL_Q}\n   - E) Can not answer based on the caption`, answer: 'E' });
  t.same(withE, { stem: 'What color is the dog?', options: ['Brown', 'White', 'Black', 'Gray'], answer: -1 });
  const mid = parseQuestion({ question: 'Q?\nA) x\nB) Cannot answer based on the caption\nC) y', answer: 'C' });
  t.same(mid, { stem: 'Q?', options: ['x', 'y'], answer: 1 }, 'letters after a dropped option shift');

  const bad: [Record<string, unknown>, string][] = [
    [{ question: 'no options here', answer: 'A' }, 'question'],
    [{ question: CAPRL_Q, answer: 'F' }, 'answer'],
    [{ question: CAPRL_Q, answer: 'purple' }, 'answer'],
    [{ question: CAPRL_Q }, 'answer'],
    [{ question: 'Q?', options: ['only'], answer: 'A' }, 'options'],
    [{ question: 'Q?', options: [1, 2], answer: 'A' }, 'options'],
    [{ question: 'Q?', options: { A: 'x', C: 'y' }, answer: 'A' }, 'options'],
    [{ answer: 'A' }, 'question'],
    [{ question: 'Q?\nA) x\nC) y', answer: 'A' }, 'question'],
  ];
  for (const [item, field] of bad) {
    throwsWith(t, () => parseQuestion(item), (e: unknown) => e instanceof QuestionFormatError && e.field === field, JSON.stringify(item));
  }
});

t.test('questions: rendering and seeded shuffles', async (t) => {
  const q = parseQuestion({ question: CAPRL_Q, answer: 'C' });
  const r = renderQuestion(q);
  t.equal(r.text, `${CAPRL_Q}\n   - E) ${CANNOT_ANSWER}`);
  t.same({ letters: r.letters, answer: r.answer, cannot: r.cannotAnswer }, { letters: 'ABCDE', answer: 'C', cannot: 'E' });
  t.equal(renderQuestion({ ...q, answer: -1 }).answer, 'E');

  const a = shuffleQuestion(q, 42, 'item-1');
  t.same(a, shuffleQuestion(q, 42, 'item-1'), 'same seed and key: same order');
  t.same([...a.options].sort(), [...q.options].sort(), 'a permutation');
  t.equal(a.options[a.answer], 'Black', 'the answer follows its option');
  const orders = new Set(Array.from({ length: 40 }, (_, i) => shuffleQuestion(q, 42, `k${i}`).options.join('|')));
  t.ok(orders.size > 10, `keys give different orders (${orders.size} of 24)`);
  t.equal(shuffleQuestion({ ...q, answer: -1 }, 1, 'x').answer, -1, '"can not answer" stays the answer, and last');
});

t.test('answer letters from replies', async (t) => {
  const L = 'ABCDE';
  const cases: [string, string | null][] = [
    [' C.', 'C'],
    ['C', 'C'],
    ['(B) White', 'B'],
    ['**D**', 'D'],
    ['B) White, because the caption says so', 'B'],
    ['The answer is E.', 'E'],
    ['the answer is: (A)', 'A'],
    ['Answer: D', 'D'],
    ['I think the answer is B', 'B'],
    ['A dog is mentioned, so the answer is C', 'C'],
    ['Based on the caption, option D', 'D'],
    ['It must be B.', 'B'],
    ['Z', null],
    ['F.', null],
    ['I cannot tell', null],
    ['', null],
    ['gibberish lef smallescribe', null],
    ['Black', 'C'],
    ['black.', 'C'],
  ];
  for (const [reply, want] of cases) t.equal(parseAnswerLetter(reply, L, ['Brown', 'White', 'Black', 'Gray', CANNOT_ANSWER]), want, JSON.stringify(reply));
  t.equal(parseAnswerLetter('I', 'ABCDEFGHI'), 'I', '"I" alone is a letter when there are nine options');
});

t.test('scores: accuracy, best-of-n, Prism aggregate, reward plan', async (t) => {
  t.equal(meanAccuracy([true, false, true, true]), 0.75);
  t.equal(meanAccuracy([]), 0);
  t.equal(bestOfN([false, false, true]), 1);
  t.equal(bestOfN([false, false]), 0);
  const s = summarizeScores([[true, false, false, false], [false, false, false, false], [true, true, true, true], []]);
  t.equal(s.items, 3, 'items without samples are not scored');
  t.equal(s.mean_accuracy, (0.25 + 0 + 1) / 3);
  t.equal(s.best_of_n, 2 / 3);
  t.same(s.per_sample_accuracy, [2 / 3, 1 / 3, 1 / 3, 1 / 3]);

  const q1 = parseQuestion({ question: CAPRL_Q, answer: 'C' });
  const q2 = parseQuestion({ question: 'Is it day?\nA) yes\nB) no', answer: 'A' });
  const items = [{ caption: 'a black dog', questions: [q1, q2] }, { caption: 'night', questions: [q2] }];
  const plain = planAsks(items, { seed: 5 });
  t.same(plain.map((a) => [a.item, a.question, a.sample, a.expected]), [[0, 0, 0, 'C'], [0, 1, 0, 'A'], [1, 0, 0, 'A']], 'every question once');
  const many = planAsks(items, { seed: 5, samplesPerQuestion: 3, shuffle: true });
  t.equal(many.length, 9);
  t.same(many, planAsks(items, { seed: 5, samplesPerQuestion: 3, shuffle: true }), 'the plan is a function of the seed');
  t.not(JSON.stringify(many), JSON.stringify(planAsks(items, { seed: 6, samplesPerQuestion: 3, shuffle: true })));
  for (const a of many) {
    const mc: MultipleChoice = items[a.item]!.questions[a.question]!;
    t.equal(a.options[a.letters.indexOf(a.expected)], mc.options[mc.answer], 'expected letter names the right option after the shuffle');
  }
  const drawn = planAsks(items, { seed: 5, questionsPerCaption: 4 });
  t.same(drawn.map((a) => a.item), [0, 0, 0, 0, 1, 1, 1, 1], 'qa_num draws per caption');
  t.ok(drawn.filter((a) => a.item === 1).every((a) => a.question === 0));

  // Rewards from fixed replies.
  const replies = ['C', 'The answer is B', ' A.'];
  const answers: AnswerDetail[] = plain.map((a, k) => ({
    question: a.question, sample: a.sample, asked: a.text, expected: a.expected, ...scoreReply(a, replies[k]!), response: replies[k]!,
  }));
  t.same(answers.map((d) => [d.predicted, d.correct]), [['C', true], ['B', false], ['A', true]]);
  const rewards = aggregateRewards(2, plain, answers);
  t.same(rewards.map((r) => [r.reward, r.correct, r.total]), [[0.5, 1, 2], [1, 1, 1]]);
});

t.test('progress lines', async (t) => {
  let now = 0;
  const out: string[] = [];
  const sink = { write: (s: string) => out.push(s), isTTY: false };
  const p = new RunProgress(sink, { label: 'caption', total: 100, unit: 'img', intervalMs: 10_000, now: () => now });
  for (let i = 0; i < 10; i++) {
    now += 500;
    p.tick(i === 3);
  }
  t.same(out, [], 'no line before an interval has passed');
  now = 10_000;
  p.tick();
  t.same(out, ['caption:  11/100  11.0%  1.10 img/s  ETA 1m21s  1 error\n']);
  p.finish();
  t.equal(out.length, 2, 'a final line');
  const tty: string[] = [];
  const bar = new RunProgress({ write: (s: string) => tty.push(s), isTTY: true, columns: 100 }, { label: 'caption', total: 4, unit: 'img', now: () => now });
  now += 1000;
  bar.tick();
  t.match(tty[0], /^\rcaption \[#+-+\]  1\/4  25\.0%/);
  t.match(tty[0], /\x1b\[K$/);
  t.equal(formatDuration(3725), '1h02m');
  t.equal(formatDuration(59.4), '59s');
});

t.test('bounded pool', async (t) => {
  let inFlight = 0;
  let peak = 0;
  const done: number[] = [];
  await runPool((async function* () { for (let i = 0; i < 20; i++) yield i; })(), 3, async (i) => {
    inFlight++;
    peak = Math.max(peak, inFlight);
    await new Promise((r) => setTimeout(r, 2 + (i % 3)));
    inFlight--;
    done.push(i);
  });
  t.equal(peak, 3);
  t.same([...done].sort((a, b) => a - b), [...Array(20).keys()]);
  let started = 0;
  await t.rejects(runPool([...Array(100).keys()], 4, async (i) => {
    started++;
    if (i === 5) throw new Error('boom');
    await new Promise((r) => setTimeout(r, 5));
  }), /boom/);
  t.ok(started < 20, `pulling stops after a failure (${started} started)`);
  const stop = new AbortController();
  let ran = 0;
  await runPool([...Array(100).keys()], 2, async (i) => {
    ran++;
    if (i === 3) stop.abort();
  }, stop.signal);
  t.ok(ran <= 6, `a stop ends the pulling (${ran} ran)`);
});

function jsonServer(handler: (body: Record<string, unknown>, n: number) => { status: number; body: unknown }): Promise<{ url: string; server: Server; hits: () => number }> {
  let n = 0;
  const server = createServer((req, res) => {
    let data = '';
    req.on('data', (c) => (data += c));
    req.on('end', () => {
      const r = handler(JSON.parse(data || '{}'), n++);
      res.writeHead(r.status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(r.body));
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
    const a = server.address() as { port: number };
    resolve({ url: `http://127.0.0.1:${a.port}`, server, hits: () => n });
  }));
}

t.test('endpoint pool: retries, request errors, failover', async (t) => {
  t.equal(chatCompletionsUrl('http://h:8000'), 'http://h:8000/v1/chat/completions');
  t.equal(chatCompletionsUrl('http://h:8000/v1/'), 'http://h:8000/v1/chat/completions');
  t.equal(chatCompletionsUrl('h:8000/v1/chat/completions'), 'http://h:8000/v1/chat/completions');

  const ok = { choices: [{ index: 0, message: { content: 'hi' }, finish_reason: 'stop' }], usage: { prompt_tokens: 3, completion_tokens: 1 } };
  const flaky = await jsonServer((_b, n) => (n === 0 ? { status: 503, body: { error: { message: 'busy' } } } : { status: 200, body: ok }));
  const refusing = await jsonServer(() => ({ status: 400, body: { error: { message: '`temperature` must be non-negative', code: 'bad' } } }));
  const healthy = await jsonServer(() => ({ status: 200, body: ok }));
  t.teardown(() => { flaky.server.close(); refusing.server.close(); healthy.server.close(); });

  const pool = new EndpointPool([flaky.url], { backoffMs: 1 });
  t.same((await pool.chat({ messages: [] })).choices?.[0]?.message?.content, 'hi', 'a 503 is retried');
  t.equal(flaky.hits(), 2);

  await rejectsWith(t, new EndpointPool([refusing.url], { backoffMs: 1 }).chat({}), (e: unknown) =>
    e instanceof RecordError && /HTTP 400/.test(e.message) && /temperature/.test(e.message) && e.code === 'bad', 'a 4xx is a record error');
  t.equal(refusing.hits(), 1, 'a 4xx is not retried');

  // A dead server: requests fail over to the live one.
  const dead = await jsonServer(() => ({ status: 200, body: ok }));
  const deadUrl = dead.url;
  await new Promise((r) => dead.server.close(r));
  const both = new EndpointPool([deadUrl, healthy.url], { backoffMs: 1 });
  for (let i = 0; i < 4; i++) await both.chat({});
  t.same(both.stats.map((s) => s.completed), [0, 4]);
  await t.rejects(new EndpointPool([deadUrl], { backoffMs: 1, retries: 2 }).chat({}), EndpointError, 'no server: the run stops');

  // Spread: with requests in flight, the least busy server gets the next one.
  const slowHits: number[] = [0, 0];
  const mk = (i: number) => jsonServer(() => {
    slowHits[i]!++;
    return { status: 200, body: ok };
  });
  const s0 = await mk(0);
  const s1 = await mk(1);
  t.teardown(() => { s0.server.close(); s1.server.close(); });
  const spread = new EndpointPool([s0.url, s1.url]);
  await Promise.all(Array.from({ length: 10 }, () => spread.chat({})));
  t.same(slowHits, [5, 5]);
});

t.test('run-batch lines', async (t) => {
  t.same(parseBatchLine('  ', 1), null);
  const l = parseBatchLine('{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}', 2)!;
  t.same(l, { custom_id: 'r1', method: 'POST', url: '/v1/chat/completions', body: { messages: [] }, line: 2 });
  for (const [raw, why] of [
    ['{', /line 3: not valid JSON/],
    ['[]', /expected a JSON object/],
    ['{"method": "POST", "url": "/v1/chat/completions", "body": {}}', /custom_id/],
    ['{"custom_id": "x", "url": "/v1/chat/completions", "body": {}}', /method/],
    ['{"custom_id": "x", "method": "POST", "body": {}}', /url/],
    ['{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}', /body/],
  ] as const) {
    throwsWith(t, () => parseBatchLine(raw, 3), (e: unknown) => e instanceof BatchInputError && why.test((e as Error).message), raw);
  }
  const ok = batchOutput('r1', 200, { object: 'chat.completion' });
  t.match(ok, { custom_id: 'r1', response: { status_code: 200, body: { object: 'chat.completion' } }, error: null });
  t.match(ok.id, /^caprl-[0-9a-f]{32}$/);
  t.match((ok.response as { request_id: string }).request_id, /^caprl-batch-[0-9a-f]{32}$/);
  const err = batchOutput('r2', 404, { error: { message: 'nope' } });
  t.match(err, { response: { status_code: 404, body: null }, error: { error: { message: 'nope' } } });
  t.match(batchErrorOutput('r3', 'URL x'), { response: { status_code: 400, body: null }, error: 'URL x' });
});

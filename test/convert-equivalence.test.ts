// Converting a Hugging Face folder gives the model the generator writes directly: the tiny
// preset's weights written as safetensors (same PRNG streams as test/helpers/models.ts's GGUF),
// converted in TypeScript, hold byte-identical tensors and the same metadata, and the real
// engine decodes the same greedy tokens from both for the same image and prompt.
import t, { type Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertHfFolder } from '../src/convert/convert.js';
import { Engine } from '../src/engine/engine.js';
import { readGGUF, readTensorBytes, readTensorF32 } from '../src/model/gguf-reader.js';
import { GGMLType } from '../src/model/gguf.js';
import { quantizeQ8_0, Q8_0_BLOCK_BYTES } from '../src/model/encodings.js';
import { greedy } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';
import { writeTinyHfFolder } from './helpers/hf-folders.js';

const GENERATOR_ONLY = ['general.name', 'general.description', 'caprl.generator.preset', 'caprl.generator.seed', 'caprl.generator.version', 'caprl.converter.version'];
const json = (v: unknown) => JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? String(x) : x));

async function sameFiles(t: Test, generated: string, converted: string): Promise<void> {
  const a = await readGGUF(generated);
  const b = await readGGUF(converted);
  t.same(b.tensors.map((x) => [x.name, x.type, x.shape]), a.tensors.map((x) => [x.name, x.type, x.shape]), 'same tensor list, types and shapes');
  let differing = 0;
  for (const x of a.tensors) if (Buffer.compare(await readTensorBytes(a, x.name), await readTensorBytes(b, x.name)) !== 0) differing++;
  t.equal(differing, 0, 'every tensor byte-identical');
  const keys = (f: typeof a) => [...f.metadata.entries.keys()].filter((k) => !GENERATOR_ONLY.includes(k));
  t.same(keys(b), keys(a), 'same metadata keys in the same order');
  t.same(keys(b).filter((k) => json(a.metadata.get(k)) !== json(b.metadata.get(k))), [], 'same metadata values (tokenizer, chat template, hparams)');
}


/** Greedy tokens for an image + prompt through the real engine; the prompt from the model's own chat template. */
async function caption(model: string, mmproj: string): Promise<{ prompt: string; tokens: number[]; text: string }> {
  const engine = new Engine({ model, mmproj, nCtx: 1024, maxSeqs: 1, nBatch: 512, nThreads: 2, logLevel: 'error' });
  try {
    const w = 224;
    const rgb = Buffer.alloc(w * w * 3);
    for (let i = 0; i < w * w; i++) {
      rgb[3 * i] = i % w;
      rgb[3 * i + 1] = (i / w) | 0;
      rgb[3 * i + 2] = ((i % w) ^ ((i / w) | 0)) & 0xff;
    }
    const prompt = engine.applyChatTemplate([{ role: 'user', content: `${engine.info.mediaMarker}Please describe this image in detail` }], true);
    const tokens: number[] = [];
    let text = '';
    for await (const ev of engine.generate({ prompt, images: [{ width: w, height: w, rgb }], sampling: greedy(24) })) {
      tokens.push(...ev.tokens);
      text += ev.text;
      if (ev.finish?.reason === 'error') throw new Error(ev.finish.error);
    }
    return { prompt, tokens, text };
  } finally {
    await engine.close();
  }
}

t.test('tiny folder (f16, 2 shards) converts to the generated tiny GGUFs; same greedy caption', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-conv-eq-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const gen = await tinyModel();
  const hf = await writeTinyHfFolder(join(dir, 'CapRL-tiny'));
  const conv = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache') });
  t.equal(conv.dtype, 'f16', '--dtype auto on f16 weights: f16');
  t.equal(conv.cached, false);
  await sameFiles(t, gen.model, conv.model);
  await sameFiles(t, gen.mmproj, conv.mmproj);
  t.equal((await readGGUF(conv.model)).metadata.value('general.name'), 'CapRL-tiny');

  const a = await caption(gen.model, gen.mmproj);
  const b = await caption(conv.model, conv.mmproj);
  t.equal(b.prompt, a.prompt, 'the chat template from tokenizer_config.json renders the same prompt');
  t.ok(a.tokens.length === 24, 'generated 24 tokens');
  t.same(b.tokens, a.tokens, 'same greedy tokens');
  t.equal(b.text, a.text);

  const again = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache') });
  t.equal(again.cached, true, 'second conversion: found in the cache');
  t.equal(again.model, conv.model);
});

t.test('transformers >= 4.52 names, one file, chat_template.jinja: same tensors', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-conv-eq-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const gen = await tinyModel();
  const hf = await writeTinyHfFolder(join(dir, 'new'), { newNames: true, shards: 1, chatTemplateIn: 'jinja' });
  const conv = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache'), dtype: 'float16' });
  await sameFiles(t, gen.model, conv.model);
  await sameFiles(t, gen.mmproj, conv.mmproj);
});

t.test('--quantization q8_0: matrices are ggml Q8_0 of the checkpoint values, vision ffn_down falls back to F16', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-conv-eq-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const gen = await tinyModel(); // f16: the values the folder holds
  const hf = await writeTinyHfFolder(join(dir, 'hf'));
  const conv = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache'), quantization: 'q8_0' });
  t.equal(conv.dtype, 'q8_0');
  for (const [g, c] of [[gen.model, conv.model], [gen.mmproj, conv.mmproj]]) {
    const a = await readGGUF(g);
    const b = await readGGUF(c);
    for (const x of b.tensors) {
      const src = await readTensorF32(a, x.name);
      const got = await readTensorBytes(b, x.name);
      if (x.type === GGMLType.Q8_0) {
        const want = new Uint8Array((src.length / 32) * Q8_0_BLOCK_BYTES);
        quantizeQ8_0(src, 0, src.length, want, 0);
        if (Buffer.compare(Buffer.from(want), got) !== 0) t.fail(`${x.name}: not the Q8_0 of the f16 values`);
      } else if (x.type === GGMLType.F16) {
        if (Buffer.compare(await readTensorBytes(a, x.name), got) !== 0) t.fail(`${x.name}: F16 differs`);
      } else {
        t.equal(x.type, GGMLType.F32, `${x.name} is F32`);
        if (Buffer.compare(Buffer.from(src.buffer, src.byteOffset, src.byteLength), got) !== 0) t.fail(`${x.name}: F32 differs`);
      }
    }
  }
  const v = await readGGUF(conv.mmproj);
  t.equal(v.tensors.find((x) => x.name === 'v.blk.0.ffn_down.weight')?.type, GGMLType.F16, 'rows of 200: F16 fallback');
  t.equal(v.tensors.find((x) => x.name === 'v.patch_embd.weight')?.type, GGMLType.F32, 'patch embedding F32 outside f16 files');
  const m = await readGGUF(conv.model);
  t.equal(m.tensors.find((x) => x.name === 'blk.0.attn_q.weight')?.type, GGMLType.Q8_0);
  t.equal(m.metadata.value('general.file_type'), 7);
  const r = await caption(conv.model, conv.mmproj);
  t.equal(r.tokens.length, 24, 'the q8_0 conversion runs in the engine');
});

t.test('bf16 checkpoint (one dtype for all, as real CapRL-3B): auto -> bf16, f16 on request', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-conv-eq-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const hf = await writeTinyHfFolder(join(dir, 'hf'), { dtype: 'bf16', tensorDtype: 'BF16' });
  const auto = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache') });
  t.equal(auto.dtype, 'bf16');
  const f16 = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache'), dtype: 'f16' });
  t.equal(f16.dtype, 'f16');
  t.not(f16.outDir, auto.outDir, 'each dtype has its own cache entry');
  const b = await readGGUF(auto.model);
  const f = await readGGUF(f16.model);
  t.equal(b.tensors.find((x) => x.name === 'blk.0.attn_norm.weight')?.type, GGMLType.F32, 'norms F32');
  t.equal(b.tensors.find((x) => x.name === 'blk.0.attn_q.weight')?.type, GGMLType.BF16);
  t.equal(f.tensors.find((x) => x.name === 'blk.0.attn_q.weight')?.type, GGMLType.F16);
  // bf16 -> f16 goes through f32 with round-to-nearest-even: the values agree to f16 precision.
  const x = await readTensorF32(b, 'blk.0.ffn_up.weight');
  const y = await readTensorF32(f, 'blk.0.ffn_up.weight');
  let worst = 0;
  for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i] - y[i]) / Math.max(Math.abs(x[i]), 6.1e-5));
  t.ok(worst <= 2 ** -11, `bf16 -> f16 relative error ${worst} <= 2^-11`);
  await t.resolves(caption(auto.model, auto.mmproj), 'bf16 conversion runs in the engine');
});

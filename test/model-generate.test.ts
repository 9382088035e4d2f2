// Generated files: determinism, metadata, tensor lists (tiny written, caprl-3b planned only),
// tokenizer layout and the generate-model CLI arguments.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateModel, runGenerateModel as runCli } from '../src/model/generate.js';
import { readGGUF, readTensorF32 } from '../src/model/gguf-reader.js';
import { GGMLType, GGUFValueType, elementCount } from '../src/model/gguf.js';
import { getPreset, PRESETS } from '../src/model/presets.js';
import { planModel, textVocab } from '../src/model/qwen25vl.js';
import { decode, encode, TokenType } from '../src/model/tokenizer.js';
import { QWEN2_VL_CHAT_TEMPLATE } from '../src/model/chat-template.js';

const sha = async (p: string) => createHash('sha256').update(await readFile(p)).digest('hex');

t.test('tiny: same seed ⇒ same bytes, other seed ⇒ other bytes', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-gen-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const a = await generateModel({ preset: 'tiny', dtype: 'f16', seed: 7, outDir: join(dir, 'a') });
  const b = await generateModel({ preset: 'tiny', dtype: 'f16', seed: 7, outDir: join(dir, 'b') });
  const c = await generateModel({ preset: 'tiny', dtype: 'f16', seed: 8, outDir: join(dir, 'c') });
  t.equal(a.model, join(dir, 'a', 'tiny-f16.gguf'));
  t.equal(a.mmproj, join(dir, 'a', 'mmproj-tiny-f16.gguf'));
  t.equal(await sha(a.model), await sha(b.model), 'model identical');
  t.equal(await sha(a.mmproj), await sha(b.mmproj), 'mmproj identical');
  t.not(await sha(a.model), await sha(c.model), 'model differs');
  t.not(await sha(a.mmproj), await sha(c.mmproj), 'mmproj differs');
  t.same((await readdir(join(dir, 'a'))).sort(), ['mmproj-tiny-f16.gguf', 'tiny-f16.gguf'], 'no leftover temp files');
});

t.test('tiny files: metadata, tensors, dtypes', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-gen-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const p = getPreset('tiny');
  const f16 = await generateModel({ preset: 'tiny', dtype: 'f16', seed: 1, outDir: dir });
  const q8 = await generateModel({ preset: 'tiny', dtype: 'q8_0', seed: 1, outDir: dir });
  const bf = await generateModel({ preset: 'tiny', dtype: 'bf16', seed: 1, outDir: dir });

  const m = await readGGUF(f16.model);
  const md = (k: string) => m.metadata.value(k);
  t.equal(md('general.architecture'), 'qwen2vl');
  t.equal(md('general.alignment'), 32);
  t.equal(md('general.file_type'), 1);
  t.equal(md('qwen2vl.block_count'), p.text.nLayer);
  t.equal(md('qwen2vl.embedding_length'), p.text.nEmbd);
  t.equal(md('qwen2vl.attention.head_count_kv'), p.text.nHeadKv);
  t.same(m.metadata.get('qwen2vl.rope.dimension_sections'), { type: GGUFValueType.ARRAY, itemType: GGUFValueType.INT32, value: [4, 6, 6, 0] });
  t.equal(m.metadata.get('qwen2vl.rope.freq_base')?.type, GGUFValueType.FLOAT32);
  t.equal(md('tokenizer.ggml.model'), 'gpt2');
  t.equal(md('tokenizer.ggml.pre'), 'qwen2');
  t.equal((md('tokenizer.ggml.tokens') as string[]).length, p.text.vocabSize);
  t.equal(md('tokenizer.ggml.eos_token_id'), 2002);
  t.equal(md('tokenizer.ggml.add_bos_token'), false);
  t.equal(md('tokenizer.chat_template'), QWEN2_VL_CHAT_TEMPLATE);
  t.notOk(m.tensors.some((x) => x.name === 'output.weight'), 'tied embeddings: no output.weight');
  const byName = new Map(m.tensors.map((x) => [x.name, x]));
  t.same(byName.get('token_embd.weight')?.shape, [128, 2048]);
  t.same(byName.get('blk.1.attn_k.weight')?.shape, [128, 64]);
  t.same(byName.get('blk.1.attn_k.bias')?.shape, [64]);
  t.same(byName.get('blk.0.ffn_down.weight')?.shape, [320, 128]);
  t.equal(byName.get('blk.0.attn_norm.weight')?.type, GGMLType.F32);
  t.equal(byName.get('blk.0.attn_q.weight')?.type, GGMLType.F16);

  const v = await readGGUF(f16.mmproj);
  const vd = (k: string) => v.metadata.value(k);
  t.equal(vd('general.architecture'), 'clip');
  t.equal(vd('clip.projector_type'), 'qwen2.5vl_merger');
  t.equal(vd('clip.has_vision_encoder'), true);
  t.equal(vd('clip.use_silu'), true);
  t.equal(vd('clip.vision.n_wa_pattern'), 2);
  t.equal(vd('clip.vision.projection_dim'), 128);
  t.same(v.metadata.get('clip.vision.image_mean')?.type, GGUFValueType.ARRAY);
  const vn = new Map(v.tensors.map((x) => [x.name, x]));
  t.same(vn.get('v.patch_embd.weight')?.shape, [14, 14, 3, 128]);
  t.same(vn.get('v.patch_embd.weight.1')?.shape, [14, 14, 3, 128]);
  t.equal(vn.get('v.patch_embd.weight')?.type, GGMLType.F16);
  t.same(vn.get('mm.0.weight')?.shape, [512, 512]);
  t.same(vn.get('mm.2.weight')?.shape, [512, 128]);
  t.same(vn.get('v.blk.3.ffn_down.weight')?.shape, [200, 128]);
  t.notOk(vn.has('v.blk.0.ln1.bias'), 'RMSNorm: no norm biases');
  t.ok(vn.has('v.post_ln.weight'));

  // q8_0: matrices Q8_0 except rows not multiple of 32 (F16); patch embd F32; 1-D F32.
  const mq = await readGGUF(q8.model);
  const vq = await readGGUF(q8.mmproj);
  t.equal(mq.metadata.value('general.file_type'), 7);
  const qt = (f: typeof mq, n: string) => f.tensors.find((x) => x.name === n)?.type;
  t.equal(qt(mq, 'token_embd.weight'), GGMLType.Q8_0);
  t.equal(qt(mq, 'blk.0.ffn_down.weight'), GGMLType.Q8_0);
  t.equal(qt(vq, 'v.blk.0.ffn_down.weight'), GGMLType.F16, 'row of 200 cannot be Q8_0');
  t.equal(qt(vq, 'v.blk.0.ffn_up.weight'), GGMLType.Q8_0);
  t.equal(qt(vq, 'v.patch_embd.weight'), GGMLType.F32);
  t.equal(qt(vq, 'mm.0.bias'), GGMLType.F32);
  const mb = await readGGUF(bf.model);
  t.equal(mb.metadata.value('general.file_type'), 32);
  t.equal(qt(mb, 'blk.0.attn_q.weight'), GGMLType.BF16);

  // Same seed: the three dtypes hold the same weights up to rounding.
  const w16 = await readTensorF32(m, 'blk.0.attn_q.weight');
  const w8 = await readTensorF32(mq, 'blk.0.attn_q.weight');
  const wb = await readTensorF32(mb, 'blk.0.attn_q.weight');
  let e8 = 0, eb = 0, ss = 0;
  for (let i = 0; i < w16.length; i++) {
    e8 = Math.max(e8, Math.abs(w8[i] - w16[i]));
    eb = Math.max(eb, Math.abs(wb[i] - w16[i]) / (Math.abs(w16[i]) || 1));
    ss += w16[i] * w16[i];
  }
  const std = Math.sqrt(ss / w16.length);
  t.ok(Math.abs(std - 1 / Math.sqrt(128)) < 0.01, `attn_q std ${std.toFixed(4)} ≈ 1/sqrt(fan-in)`);
  t.ok(e8 < 0.01, `q8_0 vs f16 max abs diff ${e8}`);
  t.ok(eb < 2 ** -7, `bf16 vs f16 max rel diff ${eb}`);
  const norm = await readTensorF32(m, 'output_norm.weight');
  t.ok(norm.every((x) => x === 1), 'norms are ones');
});

t.test('caprl-3b plan (no weights written)', async (t) => {
  const p = getPreset('caprl-3b');
  const plan = planModel(p, 'f16', 0);
  const tx = new Map(plan.text.tensors.map((x) => [x.name, x]));
  const vx = new Map(plan.vision.tensors.map((x) => [x.name, x]));
  t.equal(plan.text.tensors.length, 1 + 36 * 12 + 1);
  t.same(tx.get('token_embd.weight')?.shape, [2048, 151936]);
  t.notOk(tx.has('output.weight'));
  t.same(tx.get('blk.35.attn_q.weight')?.shape, [2048, 2048]);
  t.same(tx.get('blk.35.attn_k.weight')?.shape, [2048, 256]);
  t.same(tx.get('blk.35.attn_v.bias')?.shape, [256]);
  t.same(tx.get('blk.35.ffn_gate.weight')?.shape, [2048, 11008]);
  t.same(tx.get('blk.35.ffn_down.weight')?.shape, [11008, 2048]);
  t.equal(plan.vision.tensors.length, 2 + 32 * 16 + 5);
  t.same(vx.get('v.patch_embd.weight')?.shape, [14, 14, 3, 1280]);
  t.same(vx.get('v.blk.31.ffn_gate.weight')?.shape, [1280, 3420]);
  t.same(vx.get('v.blk.31.ffn_down.weight')?.shape, [3420, 1280]);
  t.same(vx.get('mm.0.weight')?.shape, [5120, 5120]);
  t.same(vx.get('mm.2.weight')?.shape, [5120, 2048]);
  t.same(vx.get('mm.2.bias')?.shape, [2048]);
  const params = (ts: typeof plan.text.tensors) => ts.reduce((s, x) => s + elementCount(x.shape), 0);
  const pt = params(plan.text.tensors);
  const pv = params(plan.vision.tensors);
  t.ok(pt > 3.08e9 && pt < 3.1e9, `text params ${pt}`);
  t.ok(pv > 0.66e9 && pv < 0.68e9, `vision params ${pv}`);

  const md = plan.text.metadata;
  t.equal(md.value('qwen2vl.context_length'), 128000);
  t.equal(md.value('qwen2vl.feed_forward_length'), 11008);
  t.equal(md.value('qwen2vl.attention.head_count'), 16);
  t.equal(md.value('qwen2vl.attention.head_count_kv'), 2);
  t.same(md.value('qwen2vl.rope.dimension_sections'), [16, 24, 24, 0]);
  t.equal(md.value('qwen2vl.rope.freq_base'), 1e6);
  const vm = plan.vision.metadata;
  t.equal(vm.value('clip.vision.n_wa_pattern'), 8);
  t.equal(vm.value('clip.vision.block_count'), 32);
  t.equal(vm.value('clip.vision.embedding_length'), 1280);
  t.equal(vm.value('clip.vision.feed_forward_length'), 3420);
  t.equal(vm.value('clip.vision.attention.head_count'), 16);
  t.equal(vm.value('clip.vision.projection_dim'), 2048);
  t.same(vm.value('clip.vision.image_std'), [0.26862954, 0.26130258, 0.27577711]);

  const q = planModel(p, 'q8_0', 0);
  const qv = new Map(q.vision.tensors.map((x) => [x.name, x]));
  t.equal(qv.get('v.blk.0.ffn_down.weight')?.type, GGMLType.F16, '3420-wide rows fall back to F16');
  t.equal(qv.get('v.patch_embd.weight')?.type, GGMLType.F32);
  t.equal(q.text.tensors.find((x) => x.name === 'token_embd.weight')?.type, GGMLType.Q8_0);
});

t.test('tokenizer: Qwen ids, control tokens, prompt', async (t) => {
  const v = textVocab(PRESETS['caprl-3b']);
  t.equal(v.tokens.length, 151936);
  t.equal(new Set(v.tokens).size, v.tokens.length, 'tokens unique');
  const expect: Record<string, number> = {
    '<|endoftext|>': 151643, '<|im_start|>': 151644, '<|im_end|>': 151645, '<|object_ref_start|>': 151646,
    '<|object_ref_end|>': 151647, '<|box_start|>': 151648, '<|box_end|>': 151649, '<|quad_start|>': 151650,
    '<|quad_end|>': 151651, '<|vision_start|>': 151652, '<|vision_end|>': 151653, '<|vision_pad|>': 151654,
    '<|image_pad|>': 151655, '<|video_pad|>': 151656,
  };
  for (const [tok, id] of Object.entries(expect)) {
    t.equal(v.tokens[id], tok, tok);
    t.equal(v.types[id], TokenType.CONTROL, `${tok} is control`);
  }
  t.equal(v.eosId, 151645);
  t.equal(v.padId, 151643);
  t.same(v.eogIds.slice(0, 2), [151643, 151645]);
  t.equal(v.tokens[151935], '[PAD151935]');
  t.equal(v.types[151935], TokenType.UNUSED);
  t.equal(v.tokens[0], '!', 'GPT-2 byte order');
  t.equal(v.tokens[220], '\u0120', 'space byte token at 220 as in GPT-2/Qwen');
  t.equal(v.merges.length, 151643 - 256);
  // Every merge result is a token; every merge operand is a token.
  let bad = 0;
  for (const m of v.merges) {
    const [a, b] = m.split(' ');
    if (!v.ids.has(a) || !v.ids.has(b) || !v.ids.has(a + b)) bad++;
  }
  t.equal(bad, 0, 'merges are closed over the vocabulary');

  for (const preset of [PRESETS.tiny, PRESETS['caprl-3b']]) {
    const voc = textVocab(preset);
    const ids = encode(voc, 'Please describe this image in detail');
    t.ok(ids.length <= 8, `${preset.name}: prompt is ${ids.length} tokens`);
    t.equal(decode(voc, ids), 'Please describe this image in detail');
    const chat = '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>';
    t.equal(decode(voc, encode(voc, chat, { parseSpecial: true }), { renderSpecial: true }), chat);
    const odd = 'naïve café — 日本語 🚀 x\t\ty';
    t.equal(decode(voc, encode(voc, odd)), odd, 'byte fallback round-trips any UTF-8');
  }
  const tiny = textVocab(PRESETS.tiny);
  t.equal(tiny.special['<|im_end|>'], 2002);
  t.equal(tiny.special['<|image_pad|>'], 2012);
});

t.test('generate-model CLI arguments', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const errs: string[] = [];
  const outs: string[] = [];
  const io = { stdout: { write: (s: string) => outs.push(s) }, stderr: { write: (s: string) => errs.push(s) } };
  const runGenerateModel = (argv: string[]) => runCli(argv, io);
  {
    t.equal(await runGenerateModel(['--preset', 'huge']), 2);
    t.match(errs.join(''), /bad value for --preset: "huge"/);
    errs.length = 0;
    t.equal(await runGenerateModel(['--dtype=q4_0']), 2);
    t.match(errs.join(''), /bad value for --dtype: "q4_0"/);
    errs.length = 0;
    t.equal(await runGenerateModel(['--seed', '-3']), 2);
    t.match(errs.join(''), /--seed needs a value|bad value for --seed/);
    errs.length = 0;
    t.equal(await runGenerateModel(['--seed', 'abc']), 2);
    t.match(errs.join(''), /bad value for --seed: "abc"/);
    errs.length = 0;
    t.equal(await runGenerateModel(['--frobnicate']), 2);
    t.match(errs.join(''), /unknown flag --frobnicate/);
    errs.length = 0;
    t.equal(await runGenerateModel(['--out']), 2);
    t.match(errs.join(''), /--out needs a value/);
    t.equal(await runGenerateModel(['--help']), 0);
    t.match(outs.join(''), /usage: caprl generate-model/);
    outs.length = 0;
    t.equal(await runGenerateModel(['--preset=tiny', '--dtype', 'q8_0', '--seed=5', '--out', dir]), 0);
    t.match(outs.join(''), /tiny-q8_0\.gguf/);
    t.match(errs.join(''), /generating tiny q8_0: 100%/, 'progress on stderr');
  }
  t.same((await readdir(dir)).sort(), ['mmproj-tiny-q8_0.gguf', 'tiny-q8_0.gguf']);
});

// Broken model folders are refused before anything is written, with an error that names the
// file and what is wrong with it.
import t, { type Test } from 'tap';
import { cp, mkdtemp, readFile, readdir, rm, truncate, writeFile, unlink } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertHfFolder } from '../src/convert/convert.js';
import { readSafetensorsHeader, createSafetensors, type FloatDType } from '../src/convert/safetensors.js';
import { open } from 'node:fs/promises';
import { writeTinyHfFolder } from './helpers/hf-folders.js';

let base: string;
let root: string;

t.before(async () => {
  root = await mkdtemp(join(tmpdir(), 'caprl-conv-err-'));
  base = await writeTinyHfFolder(join(root, 'base'), { shards: 1 });
});
t.teardown(() => rm(root, { recursive: true, force: true }));

let n = 0;
/** A fresh copy of the good folder, broken by `breakIt`; converting it must fail with `msg`. */
async function refused(t: Test, what: string, breakIt: (dir: string) => Promise<unknown>, msg: RegExp, opts: { dtype?: string; quantization?: string } = {}): Promise<void> {
  const dir = join(root, `case-${++n}`);
  await cp(base, dir, { recursive: true });
  await breakIt(dir);
  const cache = join(root, `cache-${n}`);
  await t.rejects(convertHfFolder({ dir, cacheDir: cache, ...opts }), msg, what);
  t.notOk(existsSync(cache) && (await readdir(cache)).length > 0, `${what}: nothing written to the cache`);
}

/** Rewrite model.safetensors keeping only the tensors `keep` accepts (data copied as is). */
async function rewriteWeights(dir: string, keep: (name: string) => boolean, extra: Array<{ name: string; dtype: FloatDType; shape: number[] }> = []): Promise<void> {
  const path = join(dir, 'model.safetensors');
  const h = await readSafetensorsHeader(path);
  const kept = [...h.tensors.values()].filter((x) => keep(x.name));
  const fh = await open(path, 'r');
  const datas = await Promise.all(kept.map(async (x) => {
    const b = Buffer.alloc(x.byteSize);
    await fh.read(b, 0, x.byteSize, x.start);
    return b;
  }));
  await fh.close();
  const all = [...kept.map((x) => ({ name: x.name, dtype: x.dtype as FloatDType, shape: x.shape })), ...extra];
  const w = await createSafetensors(join(dir, 'tmp.safetensors'), all);
  for (const [i, x] of kept.entries()) await w.writeTensor(x.name, [datas[i]]);
  for (const x of extra) await w.writeTensor(x.name, [Buffer.alloc(x.shape.reduce((a, b) => a * b, 1) * (x.dtype === 'F32' ? 4 : 2))]);
  await w.finish();
  await unlink(path);
  await cp(join(dir, 'tmp.safetensors'), path);
  await unlink(join(dir, 'tmp.safetensors'));
}

const editJson = async (dir: string, file: string, f: (j: Record<string, unknown>) => void) => {
  const j = JSON.parse(await readFile(join(dir, file), 'utf8'));
  f(j);
  await writeFile(join(dir, file), JSON.stringify(j));
};

t.test('the good folder converts', async (t) => {
  await t.resolves(convertHfFolder({ dir: base, cacheDir: join(root, 'good-cache') }));
});

t.test('missing and extra tensors', async (t) => {
  await refused(t, 'missing tensor', (d) => rewriteWeights(d, (x) => x !== 'model.layers.1.mlp.up_proj.weight'),
    /tensor model\.layers\.1\.mlp\.up_proj\.weight is missing: no safetensors file in .* has it/);
  await refused(t, 'missing vision qkv', (d) => rewriteWeights(d, (x) => x !== 'visual.blocks.2.attn.qkv.bias'),
    /tensor visual\.blocks\.2\.attn\.qkv\.bias is missing/);
  await refused(t, 'a layer config.json does not have', (d) => editJson(d, 'config.json', (j) => (j.num_hidden_layers = 1)),
    /model\.safetensors: tensor model\.layers\.1\.\S+ has no place in the model config\.json describes/);
  await refused(t, 'a tensor that is not Qwen2.5-VL', (d) => rewriteWeights(d, () => true, [
    { name: 'model.layers.0.self_attn.rotary_emb.inv_freq', dtype: 'F32', shape: [16] }, // dropped, as llama.cpp does
    { name: 'model.mm_projector.weight', dtype: 'F16', shape: [4, 4] },
  ]), /model\.safetensors: tensor model\.mm_projector\.weight has no place in the model config\.json describes/);
});

t.test('wrong shapes and dtypes', async (t) => {
  await refused(t, 'hidden_size disagrees with the weights', (d) => editJson(d, 'config.json', (j) => (j.intermediate_size = 256)),
    /model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[320, 128\], but config\.json's model needs \[256, 128\]/);
  await refused(t, 'integer weights', async (d) => {
    const raw = await readFile(join(d, 'model.safetensors'));
    const s = raw.toString('latin1');
    const i = s.indexOf('"model.norm.weight":{"dtype":"F32"');
    t.ok(i > 0);
    await writeFile(join(d, 'model.safetensors'), Buffer.from(s.replace('"model.norm.weight":{"dtype":"F32"', '"model.norm.weight":{"dtype":"I32"'), 'latin1'));
  }, /model\.safetensors: tensor model\.norm\.weight is I32; only F32, F16 and BF16/);
});

t.test('config.json problems', async (t) => {
  await refused(t, 'wrong architecture', (d) => editJson(d, 'config.json', (j) => {
    j.architectures = ['LlamaForCausalLM'];
    j.model_type = 'llama';
  }), /config\.json describes LlamaForCausalLM \(model_type "llama"\); caprl-serve converts Qwen2\.5-VL checkpoints/);
  await refused(t, 'Qwen2-VL is another model', (d) => editJson(d, 'config.json', (j) => {
    j.architectures = ['Qwen2VLForConditionalGeneration'];
    j.model_type = 'qwen2_vl';
  }), /config\.json describes Qwen2VLForConditionalGeneration/);
  await refused(t, 'bad JSON', (d) => writeFile(join(d, 'config.json'), '{"architectures": ["Qwen2_5_VLForConditionalGeneration"],,}'),
    /config\.json in .* is not valid JSON/);
  await refused(t, 'no config.json', (d) => unlink(join(d, 'config.json')), /is not a Hugging Face model folder: config\.json is missing/);
  await refused(t, 'missing vision key', (d) => editJson(d, 'config.json', (j) => delete (j.vision_config as Record<string, unknown>).depth),
    /config\.json vision_config has no depth/);
  await refused(t, 'fullatt_block_indexes llama.cpp cannot express', (d) => editJson(d, 'config.json', (j) => ((j.vision_config as Record<string, unknown>).fullatt_block_indexes = [0, 3])),
    /fullAttnBlocks 0,3 is not expressible .*llama\.cpp cannot run this model/);
  await refused(t, 'no preprocessor config', (d) => unlink(join(d, 'preprocessor_config.json')), /preprocessor_config\.json is missing/);
  await refused(t, 'bad tokenizer.json', (d) => editJson(d, 'tokenizer.json', (j) => ((j.model as Record<string, unknown>).type = 'WordPiece')),
    /tokenizer\.json: model\.type is "WordPiece"; only byte-level BPE/);
  await refused(t, 'no tokenizer.json', (d) => unlink(join(d, 'tokenizer.json')), /tokenizer\.json is missing/);
});

t.test('safetensors problems', async (t) => {
  await refused(t, 'truncated', async (d) => {
    const p = join(d, 'model.safetensors');
    const h = await readSafetensorsHeader(p);
    await truncate(p, h.size - 100);
  }, /model\.safetensors: truncated: tensor \S+ ends at byte \d+ but the file has \d+ bytes/);
  await refused(t, 'truncated inside the header', (d) => truncate(join(d, 'model.safetensors'), 100),
    /model\.safetensors: truncated: the header alone needs \d+ bytes but the file has 100/);
  await refused(t, 'garbage header', async (d) => {
    const b = Buffer.alloc(64, 0x7b);
    b.writeBigUInt64LE(56n, 0);
    await writeFile(join(d, 'model.safetensors'), b);
  }, /model\.safetensors: header is not valid JSON/);
  await refused(t, 'no weights at all', async (d) => {
    await unlink(join(d, 'model.safetensors'));
    await writeFile(join(d, 'pytorch_model.bin'), 'x');
  }, /no \*\.safetensors weights in .*pytorch_model\.bin: PyTorch pickles are not supported/);
});

t.test('index problems (two shards)', async (t) => {
  const sharded = await writeTinyHfFolder(join(root, 'sharded'), { shards: 2 });
  const run = async (what: string, f: (d: string) => Promise<unknown>, msg: RegExp) => {
    const d = join(root, `idx-${++n}`);
    await cp(sharded, d, { recursive: true });
    await f(d);
    await t.rejects(convertHfFolder({ dir: d, cacheDir: join(root, `idx-cache-${n}`) }), msg, what);
  };
  await run('a shard is missing', (d) => unlink(join(d, 'model-00002-of-00002.safetensors')),
    /model-00002-of-00002\.safetensors \(listed in model\.safetensors\.index\.json\) is missing/);
  await run('the index lists a tensor the shard lacks', (d) => editJson(d, 'model.safetensors.index.json', (j) => ((j.weight_map as Record<string, string>)['model.extra.weight'] = 'model-00001-of-00002.safetensors')),
    /model\.safetensors\.index\.json puts model\.extra\.weight in model-00001-of-00002\.safetensors, but .* has no such tensor/);
  await run('bad index JSON', (d) => writeFile(join(d, 'model.safetensors.index.json'), '{'), /model\.safetensors\.index\.json in .* is not valid JSON/);
});

t.test('unsupported options', async (t) => {
  await t.rejects(convertHfFolder({ dir: base, cacheDir: join(root, 'opt'), quantization: 'q4_k_m' }), /--quantization q4_k_m is not supported yet: it needs llama\.cpp's quantizer/);
  await t.rejects(convertHfFolder({ dir: base, cacheDir: join(root, 'opt'), quantization: 'awq' }), /--quantization awq is not supported/);
  await t.rejects(convertHfFolder({ dir: base, cacheDir: join(root, 'opt'), dtype: 'float32' }), /--dtype float32 is not supported/);
});

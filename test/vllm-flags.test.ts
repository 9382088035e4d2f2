// `caprl serve` takes vllm serve's flags: both spellings, both value forms, the JSON flags, the
// parallelism flags (1 only), the flags accepted without effect (one note each), and --help.
import t from 'tap';
import { mkdtempSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatHelp, parseArgs } from '../src/config/cli-args.js';
import { SERVE_SPEC, serveConfigFromArgs } from '../src/config/serve-config.js';
import { parseLimitMmPerPrompt, parseMmProcessorKwargs, vllmCompatConfig } from '../src/config/vllm-flags.js';

const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-vflags-'));
const model = path.join(dir, 'm.gguf');
writeFileSync(model, '');
const parse = (argv: string[], env: NodeJS.ProcessEnv = {}) => serveConfigFromArgs(parseArgs(SERVE_SPEC, argv).values, env);

t.test("CapRL's vllm serve command line, verbatim", async (t) => {
  const c = parse([model, '--trust-remote-code', '--tensor-parallel-size=1', '--pipeline-parallel-size=1',
    '--gpu_memory_utilization=0.95', '--served-model-name=caprl', '--port', '8000', '--host', '0.0.0.0']);
  t.same(c.servedModelNames, ['caprl']);
  t.equal(c.port, 8000);
  t.equal(c.host, '0.0.0.0');
  t.same(c.vllm.apiKeys, []);
  t.equal(c.vllm.limitImagesPerPrompt, 999, "vLLM V1's default");
  t.equal(c.vllm.notes.length, 1, 'one note per flag without effect');
  t.equal(c.kvCache.gpuMemoryUtilization, 0.95, '--gpu-memory-utilization sizes the KV cache where a GPU holds it');
  t.match(c.vllm.notes.join('\n'), /--trust-remote-code is accepted but has no effect/);
});

t.test('spellings and forms', async (t) => {
  for (const argv of [['--gpu-memory-utilization', '0.5'], ['--gpu_memory_utilization', '0.5'], ['--gpu-memory-utilization=0.5'], ['--gpu_memory-utilization=0.5']]) {
    t.equal(parseArgs(SERVE_SPEC, argv).values.gpuMemoryUtilization, 0.5, argv.join(' '));
  }
  t.equal(parseArgs(SERVE_SPEC, ['-tp', '1']).values.tensorParallelSize, 1, '-tp');
  t.equal(parseArgs(SERVE_SPEC, ['-pp=1']).values.pipelineParallelSize, 1, '-pp');
  t.same(parseArgs(SERVE_SPEC, ['--served-model-name', 'a', 'b']).values.servedModelName, ['a', 'b'], 'several names');
  t.same(parse([model, '--api-key', 'k1', 'k2']).vllm.apiKeys, ['k1', 'k2'], 'several keys');
});

t.test('--api-key and VLLM_API_KEY', async (t) => {
  t.same(parse([model], { VLLM_API_KEY: 'env-key' }).vllm.apiKeys, ['env-key']);
  t.same(parse([model, '--api-key', 'flag-key'], { VLLM_API_KEY: 'env-key' }).vllm.apiKeys, ['flag-key'], 'the flag wins');
  t.same(parse([model], { VLLM_API_KEY: '' }).vllm.apiKeys, [], 'empty = none');
});

t.test('parallelism: 1 only', async (t) => {
  t.throws(() => parse([model, '--tensor-parallel-size', '2']), { name: 'CliUsageError', message: /--tensor-parallel-size: only 1 is supported, got 2/ });
  t.throws(() => parse([model, '--pipeline_parallel_size=4']), { message: /--pipeline-parallel-size: only 1 is supported, got 4/ });
  t.throws(() => vllmCompatConfig({ tensorParallelSize: 0 }), { message: /only 1/ });
});

t.test('--gpu-memory-utilization range', async (t) => {
  t.throws(() => parse([model, '--gpu-memory-utilization', '1.5']), { message: /\(0, 1\]/ });
  t.throws(() => parse([model, '--gpu-memory-utilization', '0']), { message: /\(0, 1\]/ });
});

t.test('--limit-mm-per-prompt: JSON and key=value forms', async (t) => {
  t.same(parseLimitMmPerPrompt('{"image": 4}'), { image: 4 });
  t.same(parseLimitMmPerPrompt('{"image": 4, "video": 0}'), { image: 4, video: 0 });
  t.same(parseLimitMmPerPrompt('{"image": {"count": 2, "width": 512}}'), { image: 2 }, "vLLM 0.11's object form");
  t.same(parseLimitMmPerPrompt('image=4'), { image: 4 });
  t.same(parseLimitMmPerPrompt('image=4,video=1'), { image: 4, video: 1 });
  t.throws(() => parseLimitMmPerPrompt('{"image": -1}'), { message: /non-negative integer/ });
  t.throws(() => parseLimitMmPerPrompt('{"image": 4'), { message: /invalid JSON/ });
  t.throws(() => parseLimitMmPerPrompt('{"smell": 1}'), { message: /unknown modality "smell"/ });
  t.throws(() => parseLimitMmPerPrompt('image'), { message: /expected/ });
  t.equal(parse([model, '--limit-mm-per-prompt', '{"image": 4}']).vllm.limitImagesPerPrompt, 4);
  t.equal(parse([model, '--limit_mm_per_prompt=image=2']).vllm.limitImagesPerPrompt, 2);
  const v = parse([model, '--limit-mm-per-prompt', '{"image": 3, "video": 2}']).vllm;
  t.match(v.notes.join('\n'), /video inputs are not supported/);
});

t.test('--mm-processor-kwargs: min_pixels / max_pixels', async (t) => {
  t.same(parseMmProcessorKwargs('{"min_pixels": 3136, "max_pixels": 1003520}'), { minPixels: 3136, maxPixels: 1003520, ignored: [] });
  t.throws(() => parseMmProcessorKwargs('{"max_pixels": "big"}'), { message: /max_pixels must be a positive integer/ });
  t.throws(() => parseMmProcessorKwargs('{"min_pixels": 9000, "max_pixels": 8000}'), { message: /above max_pixels/ });
  t.throws(() => parseMmProcessorKwargs('[1]'), { message: /JSON object/ });
  const c = parse([model, '--mm-processor-kwargs', '{"max_pixels": 1003520}']).vllm;
  t.equal(c.maxPixels, 1003520);
  t.equal(c.minPixels, 6272);
  t.same(c.notes, []);
  const wide = parse([model, '--mm-processor-kwargs', '{"min_pixels": 3136, "max_pixels": 12845056, "fps": 2}']).vllm;
  t.equal(wide.minPixels, 6272, 'clamped to what the encoder takes');
  t.equal(wide.maxPixels, 3211264);
  t.equal(wide.notes.length, 3, 'two clamps and one key without effect, one line each');
});

t.test('--allowed-local-media-path', async (t) => {
  const media = mkdtempSync(path.join(os.tmpdir(), 'caprl-allowed-'));
  const link = `${media}-link`;
  symlinkSync(media, link);
  t.equal(parse([model, '--allowed-local-media-path', link]).vllm.allowedLocalMediaPath, realpathSync(media), 'stored resolved');
  t.throws(() => parse([model, '--allowed-local-media-path', path.join(media, 'nope')]), { message: /does not exist/ });
  t.throws(() => parse([model, '--allowed-local-media-path', model]), { message: /not a directory/ });
  t.equal(parse([model]).vllm.allowedLocalMediaPath, undefined);
});

t.test('accepted without effect: one note each; with effect: none', async (t) => {
  const c = parse([model, '--enable-prefix-caching', '--disable-log-requests', '--max-logprobs', '5', '--dtype', 'auto', '--seed', '3',
    '--max-num-batched-tokens', '1024', '--uvicorn-log-level', 'warning']);
  t.same(c.vllm.notes, ['--enable-prefix-caching is accepted but has no effect: prompts are not cached across requests']);
  t.equal(c.vllm.logRequests, false);
  t.equal(c.vllm.maxLogprobs, 5);
  t.equal(c.maxNumBatchedTokens, 1024);
  t.match(parse([model, '--no-enable-prefix-caching']).vllm.notes[0], /--no-enable-prefix-caching/);
});

t.test('unknown flags are named; --help lists every vLLM flag', async (t) => {
  t.throws(() => parseArgs(SERVE_SPEC, ['--swap-space', '4']), { message: /unrecognized argument: --swap-space/ });
  const help = formatHelp(SERVE_SPEC);
  for (const f of ['--host', '--port', '--served-model-name', '--api-key', '--max-model-len', '--max-num-seqs', '--max-num-batched-tokens',
    '--gpu-memory-utilization', '--tensor-parallel-size', '--pipeline-parallel-size', '--trust-remote-code', '--dtype', '--seed',
    '--chat-template', '--limit-mm-per-prompt', '--mm-processor-kwargs', '--allowed-local-media-path', '--enable-prefix-caching',
    '--disable-log-requests', '--uvicorn-log-level']) {
    t.match(help, f, f);
  }
});

// The table-driven flag parser and `caprl serve`'s flag handling.
import t from 'tap';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CliUsageError, formatHelp, parseArgs, type CommandSpec } from '../src/config/cli-args.js';
import { engineOptionsFor, resolveChatTemplate, SERVE_SPEC, serveConfigFromArgs } from '../src/config/serve-config.js';

const spec: CommandSpec = {
  usage: 'x',
  summary: 'test',
  positionals: [{ dest: 'model', metavar: 'MODEL', help: 'm' }],
  flags: [
    { name: 'port', type: 'int', dest: 'port', help: '' },
    { name: 'max-model-len', type: 'int', dest: 'maxModelLen', help: '' },
    { name: 'ratio', type: 'float', dest: 'ratio', help: '' },
    { name: 'host', type: 'string', dest: 'host', help: '' },
    { name: 'trust', type: 'bool', dest: 'trust', help: '' },
    { name: 'served-model-name', type: 'strings', dest: 'names', help: '' },
    { name: 'level', type: 'string', dest: 'level', choices: ['a', 'b'], help: '' },
  ],
};

t.test('forms of flags', async (t) => {
  t.same(parseArgs(spec, ['m.gguf', '--port', '8000', '--host=0.0.0.0']).values, { port: 8000, host: '0.0.0.0', model: 'm.gguf' });
  t.same(parseArgs(spec, ['--max_model_len', '4096']).values, { maxModelLen: 4096 }, 'underscores');
  t.same(parseArgs(spec, ['--max-model_len=4096']).values, { maxModelLen: 4096 }, 'mixed');
  t.same(parseArgs(spec, ['--port', '1', '--port', '2']).values, { port: 2 }, 'last wins');
  t.same(parseArgs(spec, ['--ratio', '-0.5']).values, { ratio: -0.5 }, 'negative numbers are values');
  t.same(parseArgs(spec, ['--trust']).values, { trust: true });
  t.same(parseArgs(spec, ['--trust=false']).values, { trust: false });
  t.same(parseArgs(spec, ['--no-trust']).values, { trust: false });
  t.same(parseArgs(spec, ['--served-model-name', 'a', 'b', '--port', '3']).values, { names: ['a', 'b'], port: 3 });
  t.same(parseArgs(spec, ['--served-model-name=a']).values, { names: ['a'] });
  t.same(parseArgs(spec, ['--port', '3', 'm.gguf']).values, { port: 3, model: 'm.gguf' }, 'positional after flags');
  t.same(parseArgs(spec, ['--', '--weird-name.gguf']).values, { model: '--weird-name.gguf' }, '-- ends flags');
  t.equal(parseArgs(spec, ['-h']).help, true);
  t.equal(parseArgs(spec, ['--port', '3', '--help']).help, true);
});

t.test('errors name the flag', async (t) => {
  const bad = (argv: string[], message: RegExp) =>
    t.throws(() => parseArgs(spec, argv), { name: 'CliUsageError', message }, argv.join(' '));
  bad(['--bogus', '1'], /unrecognized argument: --bogus/);
  bad(['--no-port'], /unrecognized argument: --no-port/);
  bad(['--port'], /argument --port: expected a value/);
  bad(['--port', '--host', 'x'], /argument --port: expected a value/);
  bad(['--port', 'eighty'], /argument --port: invalid int value: 'eighty'/);
  bad(['--port', '80.5'], /invalid int value/);
  bad(['--ratio', 'x'], /invalid float value/);
  bad(['--trust=maybe'], /invalid boolean value/);
  bad(['--served-model-name'], /expected at least one value/);
  bad(['--level', 'c'], /invalid choice: 'c'/);
  bad(['a.gguf', 'b.gguf'], /unrecognized argument: b.gguf/);
});

t.test('help lists every flag', async (t) => {
  const help = formatHelp(SERVE_SPEC);
  for (const f of SERVE_SPEC.flags) t.match(help, `--${f.name}`);
  t.match(help, /usage: caprl serve \[MODEL\]/);
});

t.test('serve flags -> config -> engine options', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-cli-'));
  const model = path.join(dir, 'm.gguf');
  const mmproj = path.join(dir, 'p.gguf');
  writeFileSync(model, '');
  writeFileSync(mmproj, '');
  const parse = (argv: string[]) => serveConfigFromArgs(parseArgs(SERVE_SPEC, argv).values);

  const d = parse([model]);
  t.same(d.servedModelNames, [model], 'served name defaults to the model path (vLLM)');
  t.equal(d.port, 8000);
  t.equal(d.host, undefined, 'all interfaces by default, as vLLM');
  t.equal(d.maxModelLen, 8192);
  t.same(d.kvCache, {}, 'no KV cache flag given');
  t.equal(engineOptionsFor(d, []).nCtx, 32768, 'without a GPU the KV cache holds 32768 tokens');
  t.equal(d.maxNumSeqs, undefined, 'no --max-num-seqs given');
  t.equal(engineOptionsFor(d, []).maxSeqs, 0, 'the engine then takes as many as its KV cache holds');
  const many = parse([model, '--max-num-seqs', '512']);
  t.equal(many.maxNumSeqs, 256, "vLLM's 512: llama.cpp's 256");
  t.match(many.vllm.notes, [/--max-num-seqs 512: llama.cpp decodes at most 256 sequences together; using 256/], 'said in a start-up warning');
  t.equal(d.logLevel, 'info');

  const c = parse(['--model', model, '--mmproj', mmproj, '--port', '0', '--host', '127.0.0.1', '--served-model-name', 'caprl',
    '--max-model-len', '65536', '--max_num_seqs=4', '--max-num-batched-tokens', '512', '--threads', '8', '--n-gpu-layers', '0',
    '--seed', '42', '--chat-template', '{{ messages }}', '--uvicorn-log-level', 'warning']);
  t.same(c.servedModelNames, ['caprl']);
  t.same(engineOptionsFor(c, []), {
    model, mmproj, nCtx: 65536, maxModelLen: 65536, maxSeqs: 4, nBatch: 512, nThreads: 8, nGpuLayers: 0, chatTemplate: '{{ messages }}',
  });
  t.equal(c.seed, 42);
  t.equal(engineOptionsFor(parse([model, '--ubatch-size', '1024', '--max-num-batched-tokens', '4096']), []).nUbatch, 1024, '--ubatch-size');
  t.equal(engineOptionsFor(d, []).nUbatch, undefined, 'no --ubatch-size: the engine picks');
  t.equal(c.logLevel, 'warn');

  const bad = (argv: string[], message: RegExp) =>
    t.throws(() => parse(argv), { name: 'CliUsageError', message }, argv.join(' '));
  bad([], /a model is required/);
  bad([path.join(dir, 'missing.gguf')], /model file not found/);
  bad([model, '--mmproj', path.join(dir, 'nope.gguf')], /mmproj file not found/);
  bad([model, '--model', mmproj], /given twice/);
  bad([model, '--port', '70000'], /--port/);
  bad([model, '--max-num-seqs', '0'], /--max-num-seqs: must be at least 1/);
  bad([model, '--ubatch-size', '0'], /--ubatch-size: must be at least 1/);
  bad([model, '--max-model-len', '4096', '--kv-cache-tokens', '1024'], /at least --max-model-len/);
  bad([model, '--chat-template', 'templates/missing.jinja'], /looks like a file path/);
  t.same(parse([model, '--model', model]).model, model, 'same model twice is fine');
});

t.test('--chat-template: file or inline', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-tpl-'));
  const file = path.join(dir, 't.jinja');
  writeFileSync(file, '{% for m in messages %}{{ m.content }}{% endfor %}');
  t.equal(resolveChatTemplate(file), '{% for m in messages %}{{ m.content }}{% endfor %}');
  t.equal(resolveChatTemplate('{{ x }}\\n'), '{{ x }}\n', 'inline, escapes decoded (vLLM unicode_escape)');
  t.throws(() => resolveChatTemplate('nope.jinja'), CliUsageError);
});

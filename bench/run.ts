// `npm run bench`: the captioning benchmark. Drives OpenAI-compatible servers with streaming
// caption requests (one synthetic image each, fixed output length) at several concurrency levels
// and reports captions/s, output tokens/s, TTFT, time per output token, memory.
//
//   node dist/bench/run.js --endpoint http://127.0.0.1:8000 [--model-name caprl]
//   node dist/bench/run.js --model M.gguf --mmproj P.gguf      (starts caprl and llama-server, side by side)
//
// Run with --help for every option.
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { captionBody, runLevel, StreamClient } from './client.js';
import { parseSizes, syntheticImageDataUri, type ImageSize } from './images.js';
import { markdownReport, shortTable, type BenchReport, type LevelRecord, type ServerRecord } from './report.js';
import { breakdown, caprlMetrics } from './server-metrics.js';
import { findLlamaServer, freePort, llamaServerWeightArgs, machineInfo, ManagedServer, MemorySampler, type ServerSpec } from './servers.js';
import { summarize } from './stats.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const HELP = `usage: npm run bench -- [options]

targets (one of):
  --endpoint URL            drive a running server (base URL, e.g. http://127.0.0.1:8000)
  --model PATH --mmproj P   start caprl (node bin/caprl.js serve) and llama-server with equivalent
                            settings and run the same workload against each, side by side
options:
  --servers LIST            with --model: which to start: caprl, caprl-vision (caprl with
                            --vision-encoder caprl), llama-server (default caprl,llama-server)
  --llama-server PATH       llama-server binary (default $LLAMA_SERVER or build/bin/llama-server;
                            build it with bench/build-llama-server.sh)
  --model-name NAME         \`model\` sent to --endpoint (default caprl)
  --endpoint-name NAME      name of --endpoint in the report (default endpoint)
  --server-pid PID          with --endpoint: read that process's peak RSS for the report
  --concurrency LIST        concurrency levels (default 1,8,32,64)
  --requests N|LIST         requests per level, one count or one per level
                            (default max(--min-requests, --rounds x concurrency))
  --rounds N                (default 2)
  --min-requests N          (default 8)
  --image-sizes LIST        WxH,... cycled over the requests (default 448x448,1024x1024,1280x720)
  --output-tokens N         forced output length (default 256)
  --prompt TEXT             (default "Please describe this image in detail")
  --slots N                 server slots / --max-num-seqs (default: the highest concurrency)
  --ctx-per-slot N          context per slot (default: enough for the largest image + prompt + output)
  --threads N               CPU threads for both servers (default: each server's own default)
  --n-gpu-layers N          layers on the GPU (default all: caprl -1, llama-server 999)
  --warmup N                unmeasured requests per server before the first level (default 1)
  --deadline SECONDS        stop (and mark levels truncated) this many seconds after start
  --timeout SECONDS         per-request inactivity timeout (default 600)
  --order alternate|fixed   server order per level (default alternate)
  --out DIR                 where the JSON and markdown go (default bench/results)
  --tag NAME                file name stem (default bench-<date>-<machine>)
  --log-dir DIR             server logs (default a temp folder)
  --caprl-args "..."        extra arguments for caprl serve
  --llama-args "..."        extra arguments for llama-server
`;

function intList(s: string, flag: string): number[] {
  const xs = s.split(',').map((x) => Number(x.trim()));
  if (xs.some((x) => !Number.isInteger(x) || x < 1)) throw new Error(`${flag}: expected positive integers, got "${s}"`);
  return xs;
}

function posInt(s: string | undefined, flag: string, def: number): number {
  if (s === undefined) return def;
  const n = Number(s);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${flag}: expected a non-negative integer, got "${s}"`);
  return n;
}

/** Merged vision tokens llama.cpp / HF give an image (28-multiple grid, llama.cpp's limits). */
function imageTokens(s: ImageSize): number {
  const r = (x: number) => Math.max(28, Math.round(x / 28) * 28);
  let w = r(s.width), h = r(s.height);
  const maxPx = 4096 * 784;
  if (w * h > maxPx) {
    const beta = Math.sqrt((s.width * s.height) / maxPx);
    w = Math.max(28, Math.floor(s.width / beta / 28) * 28);
    h = Math.max(28, Math.floor(s.height / beta / 28) * 28);
  }
  return Math.max(8, (w / 28) * (h / 28));
}

export async function main(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      help: { type: 'boolean', short: 'h' },
      endpoint: { type: 'string' }, 'model-name': { type: 'string' }, 'endpoint-name': { type: 'string' }, 'server-pid': { type: 'string' },
      model: { type: 'string' }, mmproj: { type: 'string' }, servers: { type: 'string' }, 'llama-server': { type: 'string' },
      concurrency: { type: 'string' }, requests: { type: 'string' }, rounds: { type: 'string' }, 'min-requests': { type: 'string' },
      'image-sizes': { type: 'string' }, 'output-tokens': { type: 'string' }, 'max-tokens': { type: 'string' }, prompt: { type: 'string' },
      slots: { type: 'string' }, 'ctx-per-slot': { type: 'string' }, threads: { type: 'string' }, 'n-gpu-layers': { type: 'string' },
      warmup: { type: 'string' }, deadline: { type: 'string' }, timeout: { type: 'string' }, order: { type: 'string' },
      out: { type: 'string' }, tag: { type: 'string' }, 'log-dir': { type: 'string' },
      'caprl-args': { type: 'string' }, 'llama-args': { type: 'string' },
    },
    strict: true,
  });
  if (v.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const tStart = performance.now();
  const deadlineAt = v.deadline !== undefined ? tStart + Number(v.deadline) * 1000 : undefined;
  if (!v.endpoint && !v.model) throw new Error('give --endpoint URL or --model PATH --mmproj PATH (see --help)');
  if (v.endpoint && v.model) throw new Error('--endpoint and --model exclude each other');
  if (v.model && !v.mmproj) throw new Error('--model needs --mmproj (the benchmark sends images)');

  const concurrency = intList(v.concurrency ?? '1,8,32,64', '--concurrency');
  const rounds = posInt(v.rounds, '--rounds', 2);
  const minRequests = posInt(v['min-requests'], '--min-requests', 8);
  const reqList = v.requests ? intList(v.requests, '--requests') : undefined;
  if (reqList && reqList.length !== 1 && reqList.length !== concurrency.length) {
    throw new Error(`--requests: give one count or one per concurrency level (${concurrency.length})`);
  }
  const requestsPerLevel = concurrency.map((c, i) => (reqList ? reqList[reqList.length === 1 ? 0 : i] : Math.max(minRequests, rounds * c)));
  const sizes = parseSizes(v['image-sizes'] ?? '448x448,1024x1024,1280x720');
  const outputTokens = posInt(v['output-tokens'] ?? v['max-tokens'], '--output-tokens', 256);
  const prompt = v.prompt ?? 'Please describe this image in detail';
  const warmup = posInt(v.warmup, '--warmup', 1);
  const timeoutMs = posInt(v.timeout, '--timeout', 600) * 1000;
  const slots = posInt(v.slots, '--slots', Math.max(...concurrency));
  const maxImageTokens = Math.max(...sizes.map(imageTokens));
  const ctxPerSlot = posInt(v['ctx-per-slot'], '--ctx-per-slot', Math.ceil((maxImageTokens + outputTokens + 128) / 256) * 256);
  const threads = v.threads !== undefined ? posInt(v.threads, '--threads', 0) : undefined;
  const ngl = v['n-gpu-layers'] !== undefined ? Number(v['n-gpu-layers']) : undefined;
  const machine = await machineInfo();
  const outDir = path.resolve(v.out ?? path.join(root, 'bench', 'results'));
  mkdirSync(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
  const machineSlug = (machine.gpus[0]?.name ?? machine.cpu).replace(/[^A-Za-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 40);
  const tag = v.tag ?? `bench-${stamp}-${machineSlug}`;
  const logDir = v['log-dir'] ? path.resolve(v['log-dir']) : mkdtempSync(path.join(os.tmpdir(), 'caprl-bench-logs-'));
  mkdirSync(logDir, { recursive: true });
  const log = (msg: string) => console.log(`[bench ${((performance.now() - tStart) / 1000).toFixed(1).padStart(6)}s] ${msg}`);
  log(`machine: ${machine.label}`);

  // The workload: one unique image per request (levels and warm-ups get disjoint seeds).
  const t0 = performance.now();
  const uris: string[][] = [];
  for (let li = 0; li < concurrency.length; li++) {
    const level: string[] = [];
    for (let i = 0; i < requestsPerLevel[li]; i++) level.push(await syntheticImageDataUri(sizes[i % sizes.length], (li + 1) * 100_000 + i));
    uris.push(level);
  }
  const warmUris: string[] = [];
  for (let i = 0; i < warmup; i++) warmUris.push(await syntheticImageDataUri(sizes[i % sizes.length], 900_000 + i));
  const totalKiB = uris.flat().reduce((a, u) => a + u.length, 0) / 1024;
  log(`${uris.flat().length} images generated in ${((performance.now() - t0) / 1000).toFixed(1)} s (${(totalKiB / 1024).toFixed(1)} MiB of data URIs)`);

  // Targets.
  interface Target { name: string; baseUrl: string; modelName: string; pid?: number; server?: ManagedServer }
  const targets: Target[] = [];
  const report: BenchReport = {
    version: 1,
    startedAt: new Date().toISOString(),
    machine,
    config: {
      model: v.model, mmproj: v.mmproj, prompt, imageSizes: sizes.map((s) => `${s.width}x${s.height}`), outputTokens,
      concurrency, requestsPerLevel, warmup,
      ...(v.model ? { slots, ctxPerSlot, threads, nGpuLayers: ngl } : {}),
    },
    servers: [],
    levels: [],
    notes: [],
  };
  const jsonPath = path.join(outDir, `${tag}.json`);
  const mdPath = path.join(outDir, `${tag}.md`);
  const save = () => {
    writeFileSync(jsonPath, JSON.stringify(report, null, 2) + '\n');
    writeFileSync(mdPath, markdownReport(report));
  };

  const started: ManagedServer[] = [];
  const cleanup = async () => {
    for (const s of started) {
      const rec = report.servers.find((r) => r.name === s.spec.name);
      if (rec) rec.peakRssMiB = s.peakRssMiB();
      await s.stop().catch(() => undefined);
    }
  };
  const onSignal = () => {
    void cleanup().then(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    if (v.endpoint) {
      const pid = v['server-pid'] ? Number(v['server-pid']) : undefined;
      targets.push({ name: v['endpoint-name'] ?? 'endpoint', baseUrl: v.endpoint.replace(/\/+$/, ''), modelName: v['model-name'] ?? 'caprl', pid });
      report.servers.push({ name: targets[0].name, baseUrl: targets[0].baseUrl });
    } else {
      const which = (v.servers ?? 'caprl,llama-server').split(',').map((s) => s.trim());
      for (const name of which) {
        const port = await freePort();
        let spec: ServerSpec;
        if (name === 'caprl' || name === 'caprl-vision') {
          const args = [path.join(root, 'bin', 'caprl.js'), 'serve', v.model!, '--mmproj', v.mmproj!, '--host', '127.0.0.1', '--port', String(port),
            '--served-model-name', 'caprl', '--max-num-seqs', String(slots), '--max-model-len', String(ctxPerSlot),
            '--kv-cache-tokens', String(slots * ctxPerSlot), '--n-gpu-layers', String(ngl ?? -1), '--uvicorn-log-level', 'warning'];
          if (threads !== undefined) args.push('--threads', String(threads));
          // caprl-vision: the same server with our batched vision encoder instead of llama.cpp's clip.
          if (name === 'caprl-vision') args.push('--vision-encoder', 'caprl');
          if (v['caprl-args']) args.push(...v['caprl-args'].split(/\s+/).filter(Boolean));
          spec = { name, command: process.execPath, args, port, modelName: 'caprl', logFile: path.join(logDir, `${name}.log`) };
        } else if (name === 'llama-server') {
          const bin = findLlamaServer(root, v['llama-server']);
          if (!bin) throw new Error('llama-server not found: build it with bench/build-llama-server.sh, or pass --llama-server PATH');
          const args = ['-m', v.model!, '--mmproj', v.mmproj!, '--host', '127.0.0.1', '--port', String(port),
            '-np', String(slots), '-c', String(slots * ctxPerSlot), '-ngl', String(ngl ?? 999), '--no-webui'];
          if (threads !== undefined) args.push('-t', String(threads));
          args.push(...(await llamaServerWeightArgs(v.model!)));
          if (v['llama-args']) args.push(...v['llama-args'].split(/\s+/).filter(Boolean));
          spec = { name, command: bin, args, port, modelName: 'caprl', logFile: path.join(logDir, 'llama-server.log') };
        } else {
          throw new Error(`--servers: unknown server "${name}" (caprl, caprl-vision, llama-server)`);
        }
        log(`starting ${name}: ${spec.command} ${spec.args.join(' ')}`);
        let server: ManagedServer;
        try {
          server = await ManagedServer.start(spec);
        } catch (err) {
          // One side failing to start must not lose the other side's numbers.
          const msg = `${name} did not start: ${err instanceof Error ? err.message : String(err)}`;
          log(msg);
          report.notes.push(msg);
          continue;
        }
        started.push(server);
        log(`${name} ready in ${server.loadSeconds.toFixed(1)} s (pid ${server.pid}, log ${spec.logFile})`);
        targets.push({ name, baseUrl: server.baseUrl, modelName: spec.modelName, pid: server.pid, server });
        const rec: ServerRecord = { name, command: spec.command, args: spec.args, baseUrl: server.baseUrl, loadSeconds: server.loadSeconds };
        report.servers.push(rec);
      }
    }

    if (targets.length === 0) throw new Error('no server to benchmark');
    const clients = new Map(targets.map((t) => [t.name, new StreamClient(t.baseUrl, Math.max(...concurrency) + 8)]));
    for (const t of [...targets]) {
      for (let i = 0; i < warmUris.length; i++) {
        const r = await clients.get(t.name)!.stream(captionBody({ model: t.modelName, prompt, imageUrl: warmUris[i], outputTokens }), { timeoutMs });
        log(`${t.name} warm-up ${i + 1}: ${r.ok ? `${r.completionTokens} tokens in ${((r.end - r.start) / 1000).toFixed(2)} s` : `FAILED ${r.error}`}`);
        if (!r.ok) {
          report.notes.push(`${t.name} failed the warm-up request (${r.error}); not benchmarked`);
          targets.splice(targets.indexOf(t), 1);
          break;
        }
      }
    }
    if (targets.length === 0) throw new Error('every server failed its warm-up request');

    for (let li = 0; li < concurrency.length; li++) {
      const c = concurrency[li];
      const order = (v.order ?? 'alternate') === 'alternate' && li % 2 === 1 ? [...targets].reverse() : targets;
      for (let oi = 0; oi < order.length; oi++) {
        const t = order[oi];
        if (deadlineAt !== undefined && performance.now() >= deadlineAt) {
          report.notes.push(`${t.name} c=${c} skipped: deadline reached`);
          log(`${t.name} c=${c}: skipped (deadline)`);
          continue;
        }
        if (t.server?.exitStatus !== undefined) {
          const msg = `${t.name} exited (${t.server.exitStatus}) before c=${c}; see ${t.server.spec.logFile}`;
          if (!report.notes.includes(msg)) report.notes.push(msg);
          log(msg);
        }
        const bodies = uris[li].map((u, i) => captionBody({ model: t.modelName, prompt, imageUrl: u, outputTokens, seed: i }));
        const sampler = t.pid !== undefined ? new MemorySampler(t.pid) : undefined;
        await sampler?.start();
        const metricsBefore = await caprlMetrics(t.baseUrl);
        log(`${t.name} c=${c}: ${bodies.length} requests`);
        const { results, truncated } = await runLevel(clients.get(t.name)!, bodies, c, { deadline: deadlineAt, timeoutMs });
        await sampler?.stop();
        const summary = summarize(c, results, truncated);
        const metricsAfter = metricsBefore && (await caprlMetrics(t.baseUrl));
        const rec: LevelRecord = {
          server: t.name, order: oi, ...summary,
          ...(sampler ? { rssPeakMiB: sampler.rssPeakMiB, gpuPeakMiB: sampler.gpuPeakMiB } : {}),
          ...(metricsBefore && metricsAfter ? { engine: breakdown(metricsBefore, metricsAfter, summary.durationS) } : {}),
        };
        report.levels.push(rec);
        if (t.server?.exitStatus !== undefined) {
          const msg = `${t.name} exited (${t.server.exitStatus}) during c=${c}; see ${t.server.spec.logFile}`;
          report.notes.push(msg);
          log(msg);
        }
        log(`${t.name} c=${c}: ${rec.completed}/${rec.requests} ok${truncated ? ' (truncated)' : ''}, ${rec.captionsPerS.toFixed(2)} captions/s, ` +
          `${rec.outputTokensPerS.toFixed(1)} tok/s, TTFT p50 ${(rec.ttftMs.p50 / 1000).toFixed(3)} s, TPOT p50 ${rec.tpotMs.p50.toFixed(2)} ms, ` +
          `mean tokens ${rec.meanOutputTokens.toFixed(1)}${rec.errors.length ? `, errors: ${rec.errors.join(' | ')}` : ''}`);
        if (rec.completed > 0 && Math.abs(rec.meanOutputTokens - outputTokens) > 0.5) {
          report.notes.push(`${t.name} c=${c}: mean output ${rec.meanOutputTokens.toFixed(1)} tokens, not the ${outputTokens} asked for`);
        }
        save();
      }
    }
    for (const c of clients.values()) c.close();
    for (const t of targets) {
      if (!t.server && t.pid !== undefined) {
        const rec = report.servers.find((r) => r.name === t.name)!;
        const k = (await import('./servers.js')).procStatusKiB(t.pid, 'VmHWM');
        if (k !== undefined) rec.peakRssMiB = k / 1024;
      }
    }
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    report.finishedAt = new Date().toISOString();
    save();
  }
  log(`wrote ${jsonPath} and ${mdPath}`);
  process.stdout.write('\n' + shortTable(report));
  const failed = report.levels.reduce((a, l) => a + l.failed, 0);
  return failed > 0 || report.levels.length === 0 ? 1 : 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
      process.exit(2);
    },
  );
}

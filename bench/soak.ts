// Soak run: mixed traffic (captions, streams, clients that hang up, broken requests, more load
// than the server holds) against a caprl server for a long time, reporting whether the load was
// held, every error, and the server's memory over the run (RSS and heap from its /metrics).
//
//   node dist/bench/soak.js                                  starts `caprl serve` on the tiny model
//   node dist/bench/soak.js --model M.gguf --mmproj P.gguf   starts it on that model
//   node dist/bench/soak.js --endpoint http://host:8000       drives a running server
//
// Exits 1 when a request failed, was lost, or /metrics disagrees with what the clients saw.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { accounted, runLoad, type LoadTally } from './load.js';
import { metricsText, metricValue } from './server-metrics.js';
import { freePort, ManagedServer } from './servers.js';
import { percentile } from './stats.js';
import { syntheticImageDataUri } from './images.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const HELP = `usage: node dist/bench/soak.js [options]

target (default: start caprl serve on the tiny generated model):
  --endpoint URL          drive a running server
  --model PATH            start caprl serve on this GGUF (with --mmproj)
  --mmproj PATH
  --model-name NAME       \`model\` in requests (default caprl)
load:
  --duration SECONDS      how long (default 300)
  --clients N             concurrent clients (default 32)
  --output-tokens N       forced output length of captions (default 16)
  --max-num-seqs N        when starting the server (default 8)
  --threads N             when starting the server: CPU threads (default: the server's own)
  --max-waiting-requests N  when starting the server (default 16)
  --sample SECONDS        progress and memory sample interval (default 10)
  --seed N                (default 1)
  --settle SECONDS        idle time before the final memory sample (default 10)
`;

interface MemSample {
  t: number;
  rssMiB: number;
  heapMiB: number;
}

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      endpoint: { type: 'string' }, model: { type: 'string' }, mmproj: { type: 'string' }, 'model-name': { type: 'string' },
      duration: { type: 'string' }, clients: { type: 'string' }, 'output-tokens': { type: 'string' },
      'max-num-seqs': { type: 'string' }, 'max-waiting-requests': { type: 'string' }, sample: { type: 'string' }, threads: { type: 'string' },
      seed: { type: 'string' }, settle: { type: 'string' }, help: { type: 'boolean' },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const num = (v: string | undefined, def: number) => (v === undefined ? def : Number(v));
  const duration = num(values.duration, 300);
  const clients = num(values.clients, 32);
  const outputTokens = num(values['output-tokens'], 16);
  const sampleS = num(values.sample, 10);
  const modelName = values['model-name'] ?? 'caprl';

  let server: ManagedServer | undefined;
  let tmp: string | undefined;
  let baseUrl = values.endpoint;
  if (!baseUrl) {
    let model = values.model;
    let mmproj = values.mmproj;
    if (!model) {
      tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-soak-'));
      const { generateModel } = await import('../src/model/generate.js');
      ({ model, mmproj } = await generateModel({ preset: 'tiny', dtype: 'f16', seed: 1, outDir: tmp }));
    }
    const port = await freePort();
    const args = [path.join(root, 'bin', 'caprl.js'), 'serve', model, ...(mmproj ? ['--mmproj', mmproj] : []),
      '--host', '127.0.0.1', '--port', String(port), '--served-model-name', modelName,
      '--max-model-len', '4096', '--max-num-seqs', String(num(values['max-num-seqs'], 8)),
      '--max-waiting-requests', String(num(values['max-waiting-requests'], 16)), '--disable-log-requests',
      ...(values.threads ? ['--threads', values.threads] : [])];
    server = await ManagedServer.start({
      name: 'caprl', command: process.execPath, args, port, modelName,
      logFile: path.join(tmp ?? os.tmpdir(), 'soak-server.log'),
    });
    baseUrl = server.baseUrl;
    console.log(`started caprl serve (pid ${server.pid}) on ${baseUrl}`);
  }

  const images = await Promise.all([[448, 448], [1024, 768], [640, 480], [300, 500]].map(([w, h], i) => syntheticImageDataUri({ width: w!, height: h! }, i)));
  const mem: MemSample[] = [];
  const t0 = Date.now();
  const sampleMem = async (): Promise<void> => {
    try {
      const text = await metricsText(baseUrl!);
      mem.push({
        t: (Date.now() - t0) / 1000,
        rssMiB: metricValue(text, 'process_resident_memory_bytes') / 2 ** 20,
        heapMiB: metricValue(text, 'nodejs_heap_size_used_bytes') / 2 ** 20,
      });
    } catch {
      // the server may be busy; next sample
    }
  };

  // Warm-up, then the baseline.
  await runLoad({ baseUrl, model: modelName, clients: 4, requests: 16, images, outputTokens, mix: { disconnect: 0, bad: 0 }, seed: 999 });
  await sampleMem();
  const before = await metricsText(baseUrl);
  const fmt = (t: LoadTally) => `${t.sent} sent: ${t.byOutcome.ok} ok, ${t.byOutcome.refused} refused (429), ${t.byOutcome.rejected} bad (4xx), ` +
    `${t.byOutcome.disconnected} hung up, ${t.byOutcome.error} errors`;
  const tally = await runLoad({
    baseUrl, model: modelName, clients, durationMs: duration * 1000, images, outputTokens, seed: num(values.seed, 1),
    sampleMs: sampleS * 1000,
    onSample: (t) => {
      void sampleMem().then(() => {
        const last = mem[mem.length - 1];
        console.log(`[${(t.elapsedMs / 1000).toFixed(0)} s] ${fmt(t)}; server RSS ${last?.rssMiB.toFixed(0) ?? '?'} MiB, heap ${last?.heapMiB.toFixed(0) ?? '?'} MiB`);
      });
    },
  });
  // Idle for a while (aborted requests finish being counted, memory settles), then the final state.
  await new Promise((r) => setTimeout(r, num(values.settle, 10) * 1000));
  await sampleMem();
  const after = await metricsText(baseUrl);
  const L = { model_name: modelName };
  const d = (name: string, labels: Record<string, string> = L) => metricValue(after, name, labels) - metricValue(before, name, labels);
  const o = tally.byOutcome;
  const checks: [string, boolean, string][] = [
    ['no request lost', accounted(tally) === tally.sent, `${accounted(tally)} of ${tally.sent} accounted`],
    ['no errors', o.error === 0, tally.errors.slice(0, 5).join(' | ') || 'none'],
    ['successes = vllm:request_success_total{stop,length}',
      d('vllm:request_success_total', { ...L, finished_reason: 'length' }) + d('vllm:request_success_total', { ...L, finished_reason: 'stop' }) === o.ok, ''],
    ['hang-ups = vllm:request_success_total{abort}', d('vllm:request_success_total', { ...L, finished_reason: 'abort' }) === o.disconnected, ''],
    ['429s = caprl:requests_rejected_total{queue_full}', d('caprl:requests_rejected_total', { ...L, reason: 'queue_full' }) === o.refused, ''],
    ['nothing running at the end', metricValue(after, 'vllm:num_requests_running', L) === 0 && metricValue(after, 'vllm:kv_cache_usage_perc', L) === 0, ''],
  ];
  const lat = tally.latencies;
  const rss = mem.map((m) => m.rssMiB);
  const report = {
    durationS: tally.elapsedMs / 1000,
    clients,
    requests: tally.sent,
    outcomes: o,
    kinds: tally.byKind,
    throughput: { requestsPerS: o.ok / (tally.elapsedMs / 1000), outputTokensPerS: tally.completionTokens / (tally.elapsedMs / 1000) },
    latencyMs: { p50: percentile(lat, 50), p99: percentile(lat, 99), max: Math.max(...lat) },
    serverRssMiB: { start: rss[0], peak: Math.max(...rss), end: rss[rss.length - 1] },
    serverHeapMiB: { start: mem[0]?.heapMiB, end: mem[mem.length - 1]?.heapMiB },
    memory: mem,
    checks: checks.map(([name, ok, detail]) => ({ name, ok, detail })),
  };
  console.log(`\n${fmt(tally)} in ${report.durationS.toFixed(0)} s with ${clients} clients`);
  console.log(`throughput ${report.throughput.requestsPerS.toFixed(1)} req/s, ${report.throughput.outputTokensPerS.toFixed(0)} output tok/s; ` +
    `latency p50 ${report.latencyMs.p50.toFixed(0)} ms, p99 ${report.latencyMs.p99.toFixed(0)} ms`);
  console.log(`server RSS: start ${report.serverRssMiB.start?.toFixed(0)} MiB, peak ${report.serverRssMiB.peak.toFixed(0)} MiB, end ${report.serverRssMiB.end?.toFixed(0)} MiB`);
  for (const c of report.checks) console.log(`${c.ok ? 'ok  ' : 'FAIL'} ${c.name}${c.detail ? ` (${c.detail})` : ''}`);
  console.log(`\n${JSON.stringify({ ...report, memory: undefined })}`);

  if (server) await server.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
  return report.checks.every((c) => c.ok) ? 0 : 1;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then((code) => process.exit(code), (err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}

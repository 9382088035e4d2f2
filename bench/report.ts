// Benchmark results: the JSON document and its markdown table.
import type { EngineBreakdown } from './server-metrics.js';
import type { MachineInfo } from './servers.js';
import type { LevelSummary } from './stats.js';

export interface ServerRecord {
  name: string;
  command?: string;
  args?: string[];
  baseUrl: string;
  loadSeconds?: number;
  /** VmHWM of the server process at the end (peak RSS over its life), MiB. */
  peakRssMiB?: number;
}

export interface LevelRecord extends LevelSummary {
  server: string;
  /** 0 = ran first at this level, 1 = second. */
  order: number;
  /** Peak RSS sampled during this level (MiB). */
  rssPeakMiB?: number;
  /** Peak GPU memory of the server process during this level (MiB, nvidia-smi). */
  gpuPeakMiB?: number;
  /** From the server's /metrics (caprl only): where the time went during the level. */
  engine?: EngineBreakdown;
}

export interface BenchReport {
  version: 1;
  startedAt: string;
  finishedAt?: string;
  machine: MachineInfo;
  config: {
    model?: string;
    mmproj?: string;
    prompt: string;
    imageSizes: string[];
    outputTokens: number;
    concurrency: number[];
    requestsPerLevel: number[];
    slots?: number;
    ctxPerSlot?: number;
    threads?: number;
    nGpuLayers?: number;
    warmup: number;
  };
  servers: ServerRecord[];
  levels: LevelRecord[];
  notes: string[];
}

const fmt = (x: number | undefined, digits = 2) => (x === undefined || !Number.isFinite(x) ? '–' : x.toFixed(digits));
const ratio = (a: number | undefined, b: number | undefined) =>
  a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0 ? '–' : `${(a / b).toFixed(2)}x`;

interface Column {
  title: string;
  get: (l: LevelRecord) => number | undefined;
  digits: number;
}

const COLUMNS: Column[] = [
  { title: 'captions/s', get: (l) => l.captionsPerS, digits: 2 },
  { title: 'out tok/s', get: (l) => l.outputTokensPerS, digits: 1 },
  { title: 'TTFT p50 s', get: (l) => l.ttftMs.p50 / 1000, digits: 3 },
  { title: 'TTFT p99 s', get: (l) => l.ttftMs.p99 / 1000, digits: 3 },
  { title: 'TPOT p50 ms', get: (l) => l.tpotMs.p50, digits: 2 },
  { title: 'TPOT p99 ms', get: (l) => l.tpotMs.p99, digits: 2 },
  { title: 'ITL p99 ms', get: (l) => l.itlMs.p99, digits: 2 },
];

/** The markdown report: header, one row per (level, server), and a ratio row where two servers ran. */
export function markdownReport(r: BenchReport): string {
  const names = [...new Set(r.levels.map((l) => l.server))];
  // Every other server is compared with llama-server (or, without it, with the second server).
  const theirs: string | undefined = names.includes('llama-server') ? 'llama-server' : names[1];
  const ours = names.filter((n) => n !== theirs);
  const lines: string[] = [];
  lines.push(`# caprl-serve benchmark: ${r.machine.label}`);
  lines.push('');
  lines.push(`- started ${r.startedAt}${r.finishedAt ? `, finished ${r.finishedAt}` : ' (in progress)'}; host ${r.machine.hostname}, ${r.machine.memoryGiB} GiB RAM`);
  if (r.config.model) lines.push(`- model \`${r.config.model}\`, mmproj \`${r.config.mmproj ?? '–'}\``);
  lines.push(`- workload: prompt "${r.config.prompt}", images ${r.config.imageSizes.join(', ')} (synthetic JPEG, unique per request), ` +
    `${r.config.outputTokens} output tokens forced (ignore_eos, min_tokens = max_tokens), greedy, streaming`);
  lines.push(`- concurrency ${r.config.concurrency.join(', ')}; requests per level ${r.config.requestsPerLevel.join(', ')}; ` +
    `warm-up ${r.config.warmup} request(s) per server` +
    (r.config.slots ? `; slots ${r.config.slots}, context ${r.config.ctxPerSlot} tokens per slot` : '') +
    (r.config.threads ? `, ${r.config.threads} threads` : ''));
  for (const s of r.servers) {
    lines.push(`- ${s.name}: ${s.command ? `\`${[s.command, ...(s.args ?? [])].join(' ')}\`` : s.baseUrl}` +
      (s.loadSeconds !== undefined ? `; ready in ${s.loadSeconds.toFixed(1)} s` : '') +
      (s.peakRssMiB !== undefined ? `; peak RSS ${s.peakRssMiB.toFixed(0)} MiB` : ''));
  }
  lines.push('');
  const head = ['c', 'server', ...COLUMNS.map((c) => c.title), 'ok/req', 'peak RSS MiB', 'GPU MiB'];
  lines.push(`| ${head.join(' | ')} |`);
  lines.push(`|${head.map((_, i) => (i < 2 ? ' --- ' : ' ---: ')).join('|')}|`);
  const levels = [...new Set(r.levels.map((l) => l.concurrency))];
  for (const c of levels) {
    const at = r.levels.filter((l) => l.concurrency === c);
    for (const l of [...at].sort((a, b) => names.indexOf(a.server) - names.indexOf(b.server))) {
      lines.push(`| ${c} | ${l.server}${l.truncated ? ' (truncated)' : ''} | ${COLUMNS.map((col) => fmt(col.get(l), col.digits)).join(' | ')} | ` +
        `${l.completed}/${l.requests} | ${fmt(l.rssPeakMiB, 0)} | ${fmt(l.gpuPeakMiB, 0)} |`);
    }
    const b = at.find((l) => l.server === theirs);
    for (const o of ours) {
      const a = at.find((l) => l.server === o);
      if (a && b) {
        lines.push(`| ${c} | **${o} / ${theirs}** | ${COLUMNS.map((col) => ratio(col.get(a), col.get(b))).join(' | ')} | | ${ratio(a.rssPeakMiB, b.rssPeakMiB)} | ${ratio(a.gpuPeakMiB, b.gpuPeakMiB)} |`);
      }
    }
  }
  lines.push('');
  lines.push(...engineTable(r.levels, names));
  // Every server but llama-server against llama-server (when it ran): issue 8 compares with it only.
  const peer = names.includes('llama-server') ? 'llama-server' : undefined;
  lines.push(...issue8Targets(r.levels, names.filter((n) => n !== peer), peer));
  if (theirs) lines.push(`Ratios are each server / ${theirs}: above 1 is better for captions/s and tok/s, below 1 is better for times and memory.`);
  lines.push('TTFT: request sent to first generated text; TPOT: (last - first token) / (tokens - 1) per request; ITL: gaps between streamed chunks; percentiles interpolate linearly (numpy default).');
  const errs = r.levels.filter((l) => l.errors.length);
  for (const l of errs) lines.push(`- errors ${l.server} c=${l.concurrency}: ${l.errors.join(' | ')}`);
  for (const n of r.notes) lines.push(`- ${n}`);
  return lines.join('\n') + '\n';
}

const ENGINE_COLUMNS: [string, (e: EngineBreakdown) => number, number][] = [
  ['requests', (e) => e.requests, 0],
  ['image prep ms', (e) => e.preprocessMs, 1],
  ['queue ms', (e) => e.queueMs, 1],
  ['image encode ms', (e) => e.imageEncodeMs, 1],
  ['prefill ms', (e) => e.prefillMs, 1],
  ['decode ms', (e) => e.decodeMs, 0],
  ['steps', (e) => e.steps, 0],
  ['step ms', (e) => e.stepMs, 2],
  ['seqs/step', (e) => e.seqsPerStep, 1],
  ['tokens/step', (e) => e.tokensPerStep, 1],
  ['model ms/step', (e) => e.modelMsPerStep, 2],
  ['sample ms/step', (e) => e.sampleMsPerStep, 3],
  ['CPU wait ms/step', (e) => e.cpuWaitMsPerStep, 2],
  ['host ms/step', (e) => e.hostMsPerStep, 3],
  ['KV moves', (e) => e.streamMoves, 0],
];

/** Per level, what caprl's /metrics says: means per request and per engine step. */
function engineTable(levels: LevelRecord[], names: string[]): string[] {
  const rows = levels.filter((l) => l.engine).sort((a, b) => a.concurrency - b.concurrency || names.indexOf(a.server) - names.indexOf(b.server));
  if (rows.length === 0) return [];
  const head = ['c', 'server', ...ENGINE_COLUMNS.map(([t]) => t)];
  return [
    'Where the time went, from the server\'s /metrics over each level (means per request; prefill = admitted -> first token, waiting on the vision encoder included; step ms = level wall time / engine steps, of which the engine thread spent model ms in llama_decode until the logits were ready, sample ms drawing tokens, CPU wait ms waiting while the vision encoder had the CPU (both on the CPU: they take turns) and host ms on the rest):',
    '',
    `| ${head.join(' | ')} |`,
    `|${head.map((_, i) => (i < 2 ? ' --- ' : ' ---: ')).join('|')}|`,
    ...rows.map((l) => `| ${l.concurrency} | ${l.server} | ${ENGINE_COLUMNS.map(([, get, digits]) => fmt(get(l.engine!), digits)).join(' | ')} |`),
    '',
  ];
}

/** Issue 8's targets, where this run measured them: captions/s at c=32 >= 5x llama-server's, TTFT p50 at c=1 < 150 ms, TPOT p50 c=32 < 2x c=1. */
function issue8Targets(levels: LevelRecord[], ours: string[], theirs: string | undefined): string[] {
  const at = (server: string, c: number) => levels.find((l) => l.server === server && l.concurrency === c && l.completed > 0);
  const out: string[] = [];
  for (const o of ours) {
    const c1 = at(o, 1), c32 = at(o, 32), t32 = theirs ? at(theirs, 32) : undefined;
    const parts: string[] = [];
    if (c32 && t32) parts.push(`captions/s at c=32 ${ratio(c32.captionsPerS, t32.captionsPerS)} ${theirs}'s (target >= 5x)`);
    if (c1) parts.push(`TTFT p50 at c=1 ${fmt(c1.ttftMs.p50, 0)} ms (target < 150)`);
    if (c1 && c32) parts.push(`TPOT p50 c=32 / c=1 ${ratio(c32.tpotMs.p50, c1.tpotMs.p50)} (target < 2x)`);
    if (parts.length) out.push(`- issue 8 targets, ${o}: ${parts.join('; ')}`);
  }
  return out.length ? [...out, ''] : [];
}

/** A compact table for the end of the console output. */
export function shortTable(r: BenchReport): string {
  const rows = [['c', 'server', 'capt/s', 'tok/s', 'TTFT p50', 'TPOT p50', 'ok']];
  for (const l of r.levels) {
    rows.push([String(l.concurrency), l.server + (l.truncated ? '*' : ''), fmt(l.captionsPerS), fmt(l.outputTokensPerS, 1),
      `${fmt(l.ttftMs.p50 / 1000, 3)}s`, `${fmt(l.tpotMs.p50)}ms`, `${l.completed}/${l.requests}`]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ')).join('\n') + '\n';
}

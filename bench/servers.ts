// Servers under test: start (caprl or llama-server) on a free loopback port, wait for /health,
// sample memory (RSS from /proc, GPU memory from nvidia-smi), stop. Plus a description of the machine.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { promisify } from 'node:util';
import { GGMLType } from '../src/model/gguf.js';
import { readGGUF } from '../src/model/gguf-reader.js';

const execFileP = promisify(execFile);

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** A field of /proc/<pid>/status in KiB (VmHWM = peak RSS, VmRSS = current), or undefined. */
export function procStatusKiB(pid: number, field: 'VmHWM' | 'VmRSS'): number | undefined {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

let nvidiaSmi: string | null | undefined;
/** Path of nvidia-smi when it exists and answers, else null (looked up once). */
export async function findNvidiaSmi(): Promise<string | null> {
  if (nvidiaSmi !== undefined) return nvidiaSmi;
  nvidiaSmi = null;
  for (const p of ['nvidia-smi', '/usr/bin/nvidia-smi', '/usr/local/nvidia/bin/nvidia-smi']) {
    try {
      await execFileP(p, ['-L'], { timeout: 10000 });
      nvidiaSmi = p;
      break;
    } catch {
      // next
    }
  }
  return nvidiaSmi;
}

/** GPU memory used per process (MiB), from nvidia-smi; empty without nvidia-smi. */
export async function gpuMemoryByPid(): Promise<Map<number, number>> {
  const smi = await findNvidiaSmi();
  const out = new Map<number, number>();
  if (!smi) return out;
  try {
    const { stdout } = await execFileP(smi, ['--query-compute-apps=pid,used_memory', '--format=csv,noheader,nounits'], { timeout: 10000 });
    for (const line of stdout.trim().split('\n')) {
      const [pid, mib] = line.split(',').map((s) => Number(s.trim()));
      if (Number.isFinite(pid) && Number.isFinite(mib)) out.set(pid, (out.get(pid) ?? 0) + mib);
    }
  } catch {
    // leave empty
  }
  return out;
}

export interface MachineInfo {
  hostname: string;
  cpu: string;
  cores: number;
  memoryGiB: number;
  gpus: { name: string; memoryMiB: number; driver: string }[];
  /** One line naming the machine for reports: the GPU when there is one, else the CPU. */
  label: string;
}

export async function machineInfo(): Promise<MachineInfo> {
  const cpu = os.cpus()[0]?.model?.trim() ?? 'unknown CPU';
  const cores = os.availableParallelism?.() ?? os.cpus().length;
  const gpus: MachineInfo['gpus'] = [];
  const smi = await findNvidiaSmi();
  if (smi) {
    try {
      const { stdout } = await execFileP(smi, ['--query-gpu=name,memory.total,driver_version', '--format=csv,noheader,nounits'], { timeout: 10000 });
      for (const line of stdout.trim().split('\n')) {
        const [name, mem, driver] = line.split(',').map((s) => s.trim());
        if (name) gpus.push({ name, memoryMiB: Number(mem), driver });
      }
    } catch {
      // no GPU info
    }
  }
  const label = gpus.length ? `${gpus.length > 1 ? `${gpus.length}x ` : ''}${gpus[0].name} (host CPU: ${cpu}, ${cores} cores)` : `${cpu}, ${cores} cores, no GPU`;
  return { hostname: os.hostname(), cpu, cores, memoryGiB: Math.round(os.totalmem() / 2 ** 30), gpus, label };
}

export interface ServerSpec {
  /** Display name: "caprl" or "llama-server". */
  name: string;
  command: string;
  args: string[];
  port: number;
  /** `model` sent in requests. */
  modelName: string;
  logFile: string;
  env?: NodeJS.ProcessEnv;
}

export class ManagedServer {
  readonly baseUrl: string;
  loadSeconds = 0;
  private exited = false;
  private exitInfo = '';

  private constructor(readonly spec: ServerSpec, readonly child: ChildProcess) {
    this.baseUrl = `http://127.0.0.1:${spec.port}`;
    child.on('exit', (code, signal) => {
      this.exited = true;
      this.exitInfo = signal ? `signal ${signal}` : `code ${code}`;
    });
  }

  /** Why the process ended ("code 1", "signal SIGSEGV"), or undefined while it runs. */
  get exitStatus(): string | undefined {
    return this.exited ? this.exitInfo : undefined;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  /** Starts the server and resolves once GET /health answers 200. */
  static async start(spec: ServerSpec, readyTimeoutMs = 600_000): Promise<ManagedServer> {
    const log = createWriteStream(spec.logFile);
    log.write(`$ ${spec.command} ${spec.args.join(' ')}\n`);
    const child = spawn(spec.command, spec.args, { stdio: ['ignore', 'pipe', 'pipe'], env: spec.env ?? process.env });
    child.stdout!.pipe(log, { end: false });
    child.stderr!.pipe(log, { end: false });
    const server = new ManagedServer(spec, child);
    const t0 = Date.now();
    while (true) {
      if (server.exited) {
        throw new Error(`${spec.name} exited during startup (${server.exitInfo}); see ${spec.logFile}`);
      }
      if (Date.now() - t0 > readyTimeoutMs) {
        await server.stop();
        throw new Error(`${spec.name} not ready after ${readyTimeoutMs / 1000} s; see ${spec.logFile}`);
      }
      try {
        const res = await fetch(`${server.baseUrl}/health`, { signal: AbortSignal.timeout(2000) });
        await res.arrayBuffer();
        if (res.status === 200) break;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 250));
    }
    server.loadSeconds = (Date.now() - t0) / 1000;
    return server;
  }

  peakRssMiB(): number | undefined {
    const k = procStatusKiB(this.pid, 'VmHWM');
    return k === undefined ? undefined : k / 1024;
  }

  /** SIGTERM, then SIGKILL after graceMs. */
  async stop(graceMs = 15_000): Promise<void> {
    if (this.exited) return;
    const gone = new Promise<void>((r) => this.child.once('exit', () => r()));
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await gone;
    clearTimeout(timer);
  }
}

/** Samples RSS (and GPU memory where nvidia-smi exists) of a process while a level runs. */
export class MemorySampler {
  rssPeakMiB = 0;
  gpuPeakMiB: number | undefined;
  private timer: NodeJS.Timeout | undefined;
  private busy = false;

  constructor(private readonly pid: number, private readonly intervalMs = 250) {}

  async start(): Promise<void> {
    const hasGpu = (await findNvidiaSmi()) !== null;
    const sample = async () => {
      if (this.busy) return;
      this.busy = true;
      const k = procStatusKiB(this.pid, 'VmRSS');
      if (k !== undefined) this.rssPeakMiB = Math.max(this.rssPeakMiB, k / 1024);
      if (hasGpu) {
        const m = (await gpuMemoryByPid()).get(this.pid);
        if (m !== undefined) this.gpuPeakMiB = Math.max(this.gpuPeakMiB ?? 0, m);
      }
      this.busy = false;
    };
    await sample();
    this.timer = setInterval(() => void sample(), hasGpu ? Math.max(this.intervalMs, 500) : this.intervalMs);
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    const k = procStatusKiB(this.pid, 'VmRSS');
    if (k !== undefined) this.rssPeakMiB = Math.max(this.rssPeakMiB, k / 1024);
  }
}

/**
 * llama-server arguments that make it load a model's weights as caprl's engine does on this CPU:
 * on a CPU with AMX, a model with quantized weights loads without weight repacking
 * (native/cpu-weights.h: ggml's AMX kernels for quantized weights crash at the pinned llama.cpp).
 */
export async function llamaServerWeightArgs(modelPath: string): Promise<string[]> {
  let amx = false;
  try {
    amx = /^flags\s*:.*\bamx_int8\b/m.test(readFileSync('/proc/cpuinfo', 'utf8'));
  } catch {
    return [];
  }
  if (!amx) return [];
  const { tensors } = await readGGUF(modelPath);
  const floats = new Set<number>([GGMLType.F32, GGMLType.F16, GGMLType.BF16]);
  return tensors.some((t) => !floats.has(t.type)) ? ['--no-repack'] : [];
}

/** Where llama-server is: $LLAMA_SERVER, build/bin/llama-server under root, or null. */
export function findLlamaServer(root: string, explicit?: string): string | null {
  for (const p of [explicit, process.env.LLAMA_SERVER, `${root}/build/bin/llama-server`]) {
    if (p && existsSync(p)) return p;
  }
  return null;
}

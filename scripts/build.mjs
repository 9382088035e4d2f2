// `npm ci` / `npm run build`: fetch the pinned llama.cpp, build it and the addon with cmake-js,
// then compile the TypeScript. CPU by default; CAPRL_CUDA=1 adds ggml's CUDA backend and kernels/.
// The build folder (build/) is kept between installs, so a second install only rebuilds what changed.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fetchLlama } from './fetch-llama.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pin = JSON.parse(readFileSync(path.join(root, 'scripts', 'llama-pin.json'), 'utf8'));
const cuda = ['1', 'true', 'on', 'yes'].includes(String(process.env.CAPRL_CUDA ?? '').toLowerCase());
const jobs = Number(process.env.CAPRL_BUILD_JOBS) || os.availableParallelism?.() || os.cpus().length;

const t0 = Date.now();
fetchLlama();

const cmakeArgs = [
  path.join(root, 'node_modules', 'cmake-js', 'bin', 'cmake-js'),
  'build', '--directory', root, '--parallel', String(jobs), '--log-level', 'warn',
  `--CDCAPRL_CUDA=${cuda ? 'ON' : 'OFF'}`,
  `--CDCAPRL_LLAMA_COMMIT=${pin.commit}`,
];
if (cuda && process.env.CAPRL_CUDA_ARCHS) cmakeArgs.push(`--CDCMAKE_CUDA_ARCHITECTURES=${process.env.CAPRL_CUDA_ARCHS}`);
console.log(`[caprl] building native engine (${cuda ? 'CUDA' : 'CPU'}, ${jobs} jobs)`);
execFileSync(process.execPath, cmakeArgs, { cwd: root, stdio: 'inherit' });

console.log('[caprl] compiling TypeScript');
execFileSync(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', root], { cwd: root, stdio: 'inherit' });
console.log(`[caprl] build done in ${((Date.now() - t0) / 1000).toFixed(0)} s`);

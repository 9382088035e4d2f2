// Obtains the pinned llama.cpp source into deps/llama.cpp.
// Source of truth: the git bundle inside the npm package node-llama-cpp (see llama-pin.json).
// We `npm pack` the tarball (no install, no postinstall, no dependencies), check its sha512
// against the pin, extract only the bundle, and clone it at the pinned commit.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pin = JSON.parse(readFileSync(path.join(root, 'scripts', 'llama-pin.json'), 'utf8'));
const depsDir = path.join(root, 'deps');
const srcDir = path.join(depsDir, 'llama.cpp');
const stampFile = path.join(srcDir, '.caprl-pin');
const stamp = `${pin.package}@${pin.version} ${pin.integrity} ${pin.commit}`;

const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'], ...opts }).toString().trim();

export function fetchLlama() {
  if (existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) {
    return srcDir;
  }
  mkdirSync(depsDir, { recursive: true });
  const packDir = path.join(depsDir, 'pack');
  rmSync(packDir, { recursive: true, force: true });
  mkdirSync(packDir, { recursive: true });
  console.log(`[caprl] fetching llama.cpp from ${pin.package}@${pin.version} (npm pack)`);
  const tgzName = run('npm', ['pack', `${pin.package}@${pin.version}`, '--silent', '--pack-destination', packDir]).split('\n').pop();
  const tgz = path.join(packDir, tgzName);
  const integrity = 'sha512-' + createHash('sha512').update(readFileSync(tgz)).digest('base64');
  if (integrity !== pin.integrity) {
    throw new Error(`integrity mismatch for ${tgzName}: got ${integrity}, pinned ${pin.integrity}`);
  }
  run('tar', ['-xzf', tgz, '-C', packDir, pin.bundlePath]);
  const bundle = path.join(packDir, pin.bundlePath);
  rmSync(srcDir, { recursive: true, force: true });
  run('git', ['clone', '--quiet', '--no-checkout', bundle, srcDir]);
  run('git', ['-c', 'advice.detachedHead=false', 'checkout', '--quiet', pin.commit], { cwd: srcDir });
  const head = run('git', ['rev-parse', 'HEAD'], { cwd: srcDir });
  if (head !== pin.commit) throw new Error(`llama.cpp checkout is at ${head}, pinned ${pin.commit}`);
  writeFileSync(stampFile, stamp);
  rmSync(packDir, { recursive: true, force: true });
  console.log(`[caprl] llama.cpp ${pin.commit.slice(0, 10)} ready in deps/llama.cpp`);
  return srcDir;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) fetchLlama();

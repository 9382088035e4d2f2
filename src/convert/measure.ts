// Conversion cost on CapRL-3B's real shape: writes a caprl-3b-shaped Hugging Face folder (random
// weights, bf16 like the real checkpoint, two shards), converts it in a fresh process (wall time
// and peak RSS of that process), converts again (cache hit), then deletes everything.
//
//   node dist/src/convert/measure.js [--dir /tmp/caprl-measure] [--dtype f16] [--quantization q8_0] [--keep]

import { spawnSync } from 'node:child_process';
import { rmSync, statSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PRESETS } from '../model/presets.js';
import { convertHfFolder } from './convert.js';
import { writeHfFolder } from './hf-fixture.js';

const gb = (n: number) => `${(n / 1e9).toFixed(2)} GB`;
const dirSize = (d: string) => readdirSync(d).reduce((s, f) => s + statSync(join(d, f)).size, 0);

/** In the child: one conversion, then a JSON line with its numbers. */
async function child(dir: string, cacheDir: string, quantization?: string, dtype?: string): Promise<void> {
  const t0 = performance.now();
  const r = await convertHfFolder({ dir, cacheDir, quantization, dtype, name: 'caprl-3b-shaped' });
  const s = (performance.now() - t0) / 1000;
  const ru = process.resourceUsage();
  process.stdout.write(`${JSON.stringify({ seconds: s, maxRssMB: ru.maxRSS / 1024, cached: r.cached, outBytes: statSync(r.model).size + statSync(r.mmproj).size, dtype: r.dtype })}\n`);
}

async function main(argv: string[]): Promise<void> {
  const arg = (f: string) => (argv.includes(f) ? argv[argv.indexOf(f) + 1] : undefined);
  const dir = arg('--dir') ?? '/tmp/caprl-measure';
  const q = arg('--quantization');
  const dtype = arg('--dtype');
  if (argv[0] === '--child') return child(argv[1], argv[2], argv[3] || undefined, argv[4] || undefined);
  const hf = join(dir, 'hf');
  const cache = join(dir, 'cache');
  rmSync(dir, { recursive: true, force: true });
  try {
    let t0 = performance.now();
    let last = -1;
    await writeHfFolder({
      shape: PRESETS['caprl-3b'], seed: 0, outDir: hf, dtype: 'bf16', tensorDtype: 'BF16', shards: 2,
      onProgress: (d, t) => {
        const p = Math.floor((10 * d) / t);
        if (p !== last) process.stderr.write(`writing folder: ${(last = p) * 10}%\n`);
      },
    });
    console.log(`folder: ${gb(dirSize(hf))} written in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const self = fileURLToPath(import.meta.url);
    for (const pass of ['first', 'second (cached)']) {
      t0 = performance.now();
      const r = spawnSync(process.execPath, [self, '--child', hf, cache, q ?? '', dtype ?? ''], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
      if (r.status !== 0) throw new Error(`conversion failed (exit ${r.status})`);
      const m = JSON.parse(r.stdout.trim().split('\n').pop()!);
      console.log(`conversion ${pass}: ${m.seconds.toFixed(1)} s (process ${((performance.now() - t0) / 1000).toFixed(1)} s), peak RSS ${m.maxRssMB.toFixed(0)} MB, output ${gb(m.outBytes)} ${m.dtype}, cached=${m.cached}`);
    }
  } finally {
    if (!argv.includes('--keep')) rmSync(dir, { recursive: true, force: true });
  }
}

await main(process.argv.slice(2));

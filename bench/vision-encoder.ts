// Vision encoder micro-benchmark: our batched Qwen2.5-VL encoder (native/qwen-vision-encoder.cpp)
// vs llama.cpp's clip (through mtmd, one image at a time, as the engine uses it), on the same
// synthetic RGB images: ms per image (preprocessing included, as the engine would pay it) per size
// and batch size, and the relative error of ours against clip.
//
//   node dist/bench/vision-encoder.js --model M.gguf --mmproj P.gguf [--sizes 224x224,448x448]
//     [--batches 1,4] [--repeat 3] [--threads 1] [--cpu] [--json FILE]
//
// Each (size, batch) cell: `batch` distinct images; clip encodes them one by one, ours in one pass;
// one untimed warm-up call per encoder and cell (graph allocation), then the median of --repeat.
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { loadAddon } from '../src/engine/native.js';
import type { EngineImage, NativeVisionEncoder, VisionEncodeResult, VisionEncoderKind } from '../src/engine/native-types.js';
import { parseSizes, syntheticRgb } from './images.js';
import { percentile, relError } from './stats.js';

interface VisionBenchRow {
  size: string;
  batch: number;
  tokens: number;
  clipMsPerImage: number;
  oursMsPerImage: number;
  speedup: number;
  /** Worst relative error of ours vs clip over the batch's images. */
  relError: number;
  /** Ours, ms per image by phase (of the median call). */
  oursPhasesPerImage?: Phases;
}

type Phases = NonNullable<VisionEncodeResult['phases']>;

function time(enc: NativeVisionEncoder, images: EngineImage[], repeat: number): { ms: number; embeddings: Float32Array[]; nEmbd: number; phases?: Phases } {
  const first = enc.encode(images);  // warm-up: allocates this shape's graph
  const runs: VisionEncodeResult[] = [];
  for (let r = 0; r < repeat; r++) runs.push(enc.encode(images));
  const ms = percentile(runs.map((x) => x.ms), 50);
  // The phases of the median call.
  const median = runs.reduce((a, b) => (Math.abs(b.ms - ms) < Math.abs(a.ms - ms) ? b : a));
  return { ms, embeddings: first.embeddings, nEmbd: first.nEmbd, phases: median.phases };
}

function runVisionBench(opts: {
  model: string; mmproj: string; sizes: string; batches: number[]; repeat: number; threads: number; useGpu: boolean;
  log?: (line: string) => void;
}): VisionBenchRow[] {
  const log = opts.log ?? ((l: string) => console.log(l));
  const addon = loadAddon();
  const make = (encoder: VisionEncoderKind) =>
    new addon.VisionEncoder({ model: opts.model, mmproj: opts.mmproj, encoder, nThreads: opts.threads, useGpu: opts.useGpu });
  const clip = make('llama.cpp');
  const ours = make('caprl');
  const rows: VisionBenchRow[] = [];
  log('| size | batch | tokens/image | clip ms/image | ours ms/image | speed-up | rel. error |');
  log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const { width, height } of parseSizes(opts.sizes)) {
    for (const batch of opts.batches) {
      const images = Array.from({ length: batch }, (_, i) => ({ width, height, rgb: syntheticRgb(width, height, i + 1) }));
      const c = time(clip, images, opts.repeat);
      const o = time(ours, images, opts.repeat);
      const err = Math.max(...o.embeddings.map((e, i) => relError(e, c.embeddings[i])));
      const perImage = o.phases && (Object.fromEntries(Object.entries(o.phases).map(([k, v]) => [k, v / batch])) as Phases);
      const row: VisionBenchRow = {
        size: `${width}x${height}`, batch, tokens: c.embeddings[0].length / c.nEmbd,
        clipMsPerImage: c.ms / batch, oursMsPerImage: o.ms / batch, speedup: c.ms / o.ms, relError: err, oursPhasesPerImage: perImage,
      };
      rows.push(row);
      log(`| ${row.size} | ${batch} | ${row.tokens} | ${row.clipMsPerImage.toFixed(1)} | ${row.oursMsPerImage.toFixed(1)} | ` +
        `${row.speedup.toFixed(2)}x | ${err.toExponential(2)} |`);
    }
  }
  const withPhases = rows.filter((r) => r.oursPhasesPerImage);
  if (withPhases.length) {
    log('');
    log('ours, ms per image by phase: prep (pixels to patches, CPU), build (graph + allocation), upload, compute, download');
    log('| size | batch | prep | build | upload | compute | download |');
    log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
    for (const r of withPhases) {
      const p = r.oursPhasesPerImage!;
      log(`| ${r.size} | ${r.batch} | ${[p.prepMs, p.buildMs, p.uploadMs, p.computeMs, p.downloadMs].map((x) => x.toFixed(2)).join(' | ')} |`);
    }
  }
  return rows;
}

const HELP = `usage: node dist/bench/vision-encoder.js --model M.gguf --mmproj P.gguf [options]
  --sizes LIST      image sizes WxH (default 224x224,448x448)
  --batches LIST    images per encode call (default 1,4)
  --repeat N        timed calls per cell, median reported (default 3)
  --threads N       CPU threads for both encoders (default 1)
  --cpu             stay on the CPU even where a GPU exists
  --json FILE       also write the rows as JSON
  --max-error X     exit 1 when ours differs from clip by more than X (relative, any image)`;

const { values } = parseArgs({
  options: {
    model: { type: 'string' }, mmproj: { type: 'string' }, sizes: { type: 'string', default: '224x224,448x448' },
    batches: { type: 'string', default: '1,4' }, repeat: { type: 'string', default: '3' }, threads: { type: 'string', default: '1' },
    cpu: { type: 'boolean', default: false }, json: { type: 'string' }, 'max-error': { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (values.help || !values.model || !values.mmproj) {
  console.log(HELP);
  process.exit(values.help ? 0 : 2);
}
const rows = runVisionBench({
  model: values.model, mmproj: values.mmproj, sizes: values.sizes!, batches: values.batches!.split(',').map(Number),
  repeat: Number(values.repeat), threads: Number(values.threads), useGpu: !values.cpu,
});
if (values.json) writeFileSync(values.json, JSON.stringify(rows, null, 2) + '\n');
const maxError = values['max-error'] === undefined ? Infinity : Number(values['max-error']);
const worst = Math.max(...rows.map((r) => r.relError));
if (!(worst <= maxError)) {
  console.error(`vision-encoder: relative error ${worst.toExponential(2)} above --max-error ${maxError}`);
  process.exit(1);
}

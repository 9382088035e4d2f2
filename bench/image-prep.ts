// Image preparation in the server's JS path (src/images/prepare.ts: decode, orient, flatten,
// sRGB, resize to the Qwen grid with llama.cpp's limits), per JPEG size, one image at a time:
// the part of TTFT spent before the engine sees a request. Side by side in one process:
//   prepareImage     sharp decodes, the addon's resizeRgb resizes (Pillow's bicubic)
//   sharp resize     the same pipeline with sharp's own cubic resize (prepare.ts before it used
//                    resizeRgb), for comparison
//   decode only      sharp's decode to raw RGB, the floor of both
//
//   node dist/bench/image-prep.js [--sizes 640x480,1024x1024,1920x1080,4000x3000] [--rounds 9]
import { parseArgs } from 'node:util';
import sharp from 'sharp';
import { prepareImage, rgbDecoder } from '../src/images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS, smartResize } from '../src/images/qwen-resize.js';
import { parseSizes, syntheticRgb } from './images.js';
import { percentile } from './stats.js';

async function medianMs(rounds: number, f: () => Promise<unknown>): Promise<number> {
  await f(); // warm-up
  const ms: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const t0 = performance.now();
    await f();
    ms.push(performance.now() - t0);
  }
  return percentile(ms, 50);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { sizes: { type: 'string', default: '640x480,1024x1024,1920x1080,4000x3000' }, rounds: { type: 'string', default: '9' } },
  });
  const rounds = Number(values.rounds);
  console.log(`sharp ${sharp.versions.sharp}, libvips ${sharp.versions.vips}, sharp.concurrency() = ${sharp.concurrency()}; median of ${rounds}, ms per image`);
  console.log('| JPEG | grid | decode only | sharp resize | prepareImage | prepareImage / sharp resize |');
  console.log('| --- | --- | ---: | ---: | ---: | ---: |');
  for (const size of parseSizes(values.sizes)) {
    const { width, height } = size;
    const jpeg = await sharp(syntheticRgb(width, height, 1), { raw: { width, height, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
    const target = smartResize(height, width, LLAMA_CPP_QWEN25VL_LIMITS);
    const decodeMs = await medianMs(rounds, () => rgbDecoder(jpeg).removeAlpha().raw({ depth: 'uchar' }).toBuffer());
    const sharpMs = await medianMs(rounds, () => rgbDecoder(jpeg)
      .resize(target.width, target.height, { fit: 'fill', kernel: 'cubic', fastShrinkOnLoad: false })
      .removeAlpha().raw({ depth: 'uchar' }).toBuffer());
    const prepMs = await medianMs(rounds, () => prepareImage(jpeg, LLAMA_CPP_QWEN25VL_LIMITS));
    console.log(`| ${width}x${height} | ${target.width}x${target.height} | ${decodeMs.toFixed(1)} | ${sharpMs.toFixed(1)} | ${prepMs.toFixed(1)} | ${(prepMs / sharpMs).toFixed(2)}x |`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

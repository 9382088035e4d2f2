// Our batched Qwen2.5-VL vision encoder (native/qwen-vision-encoder.cpp) against llama.cpp's clip
// (through mtmd, as the engine uses it) on the tiny model: same rows in the same order, at sizes
// whose patch grid is and is not a multiple of the 8x8-patch window, one image per pass and several
// images of different sizes in one pass.
import t from 'tap';
import { loadAddon } from '../src/engine/native.js';
import type { EngineImage, NativeVisionEncoder } from '../src/engine/native-types.js';
import { syntheticRgb } from '../bench/images.js';
import { relError } from '../bench/stats.js';
import { tinyModel } from './helpers/models.js';
import { pngDataUri, startTestServer } from './helpers/server.js';

// Both use flash attention with f16 K/V; clip runs it over the whole image with a window mask,
// ours over each window, so the f16/f32 sums differ slightly: measured <= 1e-3 on the tiny model
// (0 where every window is full). Deliberate bugs measured at 0.11-0.14 (rope x/y swapped),
// 0.13-0.18 (window padding not masked), 0.57-0.62 (merged rows left in window order).
const BOUND = 1e-2;

// 56x84 and 308x196 are resized by llama.cpp's rule (too small / not on the 28 px grid); the
// others' grids (8x8, 16x16, 22x14 → 11x7 units, 30x26 → 15x13 units) leave partial windows.
const sizes: [number, number][] = [[56, 84], [224, 224], [308, 196], [420, 364], [333, 250]];
const images: EngineImage[] = sizes.map(([w, h], i) => ({ width: w, height: h, rgb: syntheticRgb(w, h, i + 1) }));

t.test('caprl encoder equals llama.cpp clip', async (t) => {
  const { model, mmproj } = await tinyModel();
  const addon = loadAddon();
  const ours: NativeVisionEncoder = new addon.VisionEncoder({ model, mmproj, encoder: 'caprl', nThreads: 1 });
  const clip: NativeVisionEncoder = new addon.VisionEncoder({ model, mmproj, encoder: 'llama.cpp', nThreads: 1 });

  const single = images.map((img) => ours.encode([img]).embeddings[0]);
  const ref = clip.encode(images);
  t.equal(ref.embeddings.length, images.length);
  for (let i = 0; i < images.length; i++) {
    const [w, h] = sizes[i];
    const err = relError(single[i], ref.embeddings[i]);
    t.equal(single[i].length, ref.embeddings[i].length, `${w}x${h}: same number of rows`);
    t.ok(err < BOUND, `${w}x${h}: relative error vs clip ${err.toExponential(2)} < ${BOUND}`);
  }

  // All sizes in one pass, twice over in a shuffled order: each image's rows exactly as when alone
  // (on the CPU every window, image and matrix row is computed the same way in any batch, so
  // batching images cannot change a caption; a GPU's GEMMs may pick other kernels per batch size,
  // where the bench's --max-error bounds the drift).
  const order = [3, 0, 4, 1, 2, 2, 0, 3, 1, 4];
  const batched = ours.encode(order.map((k) => images[k]));
  t.equal(batched.embeddings.length, order.length);
  order.forEach((k, j) => {
    const err = relError(batched.embeddings[j], single[k]);
    t.equal(err, 0, `batch entry ${j} (${sizes[k].join('x')}): relative error vs alone ${err.toExponential(2)}`);
  });
});

t.test('caprl encoder reserves its largest graph up front, and batches stay within it', async (t) => {
  const { model, mmproj } = await tinyModel();
  const addon = loadAddon();
  const ours = new addon.VisionEncoder({ model, mmproj, encoder: 'caprl', nThreads: 1 });
  const before = ours.memory();
  t.equal(before?.maxPatches, 16384, 'on the CPU: one largest image (4096 tokens) per graph');
  t.equal(before?.devices.length, 1, 'the CPU runs it all');
  t.equal(before?.devices[0].computeBytes, 0, 'no compute buffers before the first batch');
  t.ok((before?.devices[0].weightsBytes ?? 0) > 0, 'its weights are loaded');

  ours.reserve();
  const reserved = ours.memory()?.devices[0].computeBytes ?? 0;
  t.ok(reserved > 0, `reserve() allocated ${reserved} bytes before any image`);

  // The largest image, one with padded edge windows, and many small ones: each batch's graphs
  // fit the buffers already there.
  const big = (w: number, h: number): EngineImage => ({ width: w, height: h, rgb: Buffer.alloc(w * h * 3, 128) });
  for (const batch of [[big(1736, 1848)], images.concat(images, images)]) {
    ours.encode(batch);
    t.equal(ours.memory()?.devices[0].computeBytes, reserved, `${batch.length} image(s) encoded within the reservation`);
  }

  const clip = new addon.VisionEncoder({ model, mmproj, encoder: 'llama.cpp', nThreads: 1 });
  clip.reserve();
  t.equal(clip.memory(), null, "llama.cpp's encoder reports nothing of ours");
});

t.test('caprl encoder refuses what it cannot encode', async (t) => {
  const { model, mmproj } = await tinyModel();
  const addon = loadAddon();
  t.throws(() => new addon.VisionEncoder({ model, mmproj: model, encoder: 'caprl' }), /qwen2.5vl_merger|mmproj/);
  const ours = new addon.VisionEncoder({ model, mmproj, encoder: 'caprl', nThreads: 1 });
  t.throws(() => ours.encode([{ width: 10, height: 10, rgb: Buffer.alloc(5) }]), /does not match/);
});

t.test('greedy captions through the server: --vision-encoder caprl equals llama.cpp', async (t) => {
  const engine = { nThreads: 1, nVisionThreads: 1 };
  const ref = await startTestServer({ engine });
  t.teardown(() => ref.close());
  const ours = await startTestServer({ engine: { ...engine, visionEncoder: 'caprl' } });
  t.teardown(() => ours.close());

  // Concurrent requests, one with two images, so the worker has several images queued at once.
  const uris = await Promise.all(sizes.map(([w, h]) => pngDataUri(w, h)));
  const requests = [[0], [1, 2], [3], [4], [2]].map((imgs) => ({
    model: 'caprl',
    messages: [{ role: 'user' as const, content: [
      ...imgs.map((k) => ({ type: 'image_url' as const, image_url: { url: uris[k] } })),
      { type: 'text' as const, text: 'Describe the image.' },
    ] }],
    temperature: 0,
    max_tokens: 12,
  }));
  const run = (s: typeof ref) => Promise.all(requests.map((r) => s.client.chat.completions.create(r)));
  const [a, b] = [await run(ref), await run(ours)];
  for (let i = 0; i < requests.length; i++) {
    t.equal(b[i].usage?.completion_tokens, 12);
    t.equal(b[i].choices[0].message.content, a[i].choices[0].message.content, `request ${i}: same greedy text`);
  }
});

t.test('images of requests admitted in one step are encoded in one pass', async (t) => {
  // Handed to the worker one by one, the pass that started on the first image took only the
  // images queued by then (2 + 2 of 4, measured); now the step's images go over together. A pass's
  // images all report the pass's time, so one pass = one imageEncode value.
  const { Engine } = await import('../src/engine/engine.js');
  const { greedy, patternImage } = await import('./helpers/engine-inputs.js');
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, visionEncoder: 'caprl', nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, nVisionThreads: 1, imageCacheBytes: 0, logLevel: 'error' });
  t.teardown(() => engine.close());
  const prompt = `<|im_start|>user\n<|vision_start|>${engine.info.mediaMarker}<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n`;
  const encodeSeconds = await Promise.all([0, 1, 2, 3].map(async (i) => {
    let seconds = -1;
    for await (const ev of engine.generate({ prompt, images: [patternImage(448, 11 + i)], sampling: greedy(2) })) {
      if (ev.finish) seconds = ev.finish.timings?.imageEncode ?? -1;
    }
    return seconds;
  }));
  t.ok(encodeSeconds[0]! > 0, `encoded in ${encodeSeconds[0]} s`);
  t.same(new Set(encodeSeconds).size, 1, `one pass for the 4 images: ${encodeSeconds.join(', ')}`);
});

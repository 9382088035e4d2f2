// smartResize against transformers' Qwen2VL smart_resize (values computed with the HF formula:
// round-half-even to 28, floor-scale above max_pixels, ceil-scale below min_pixels).
import t from 'tap';
import {
  HF_MAX_PIXELS, HF_MIN_PIXELS, ImageSizeError, LLAMA_CPP_QWEN25VL_LIMITS, pyRound, qwenImageTokens, smartResize,
} from '../src/images/qwen-resize.js';

t.test('HF defaults', async (t) => {
  t.equal(HF_MIN_PIXELS, 3136);
  t.equal(HF_MAX_PIXELS, 12845056);
  t.same(LLAMA_CPP_QWEN25VL_LIMITS, { minPixels: 6272, maxPixels: 3211264 });
});

t.test('python round (half to even)', async (t) => {
  t.equal(pyRound(0.5), 0);
  t.equal(pyRound(1.5), 2);
  t.equal(pyRound(2.5), 2);
  t.equal(pyRound(3.5), 4);
  t.equal(pyRound(2.4999), 2);
  t.equal(pyRound(2.5001), 3);
});

// [height, width] -> [height, width], as HF's smart_resize returns them.
const cases: [number, number, number, number, string][] = [
  [224, 224, 224, 224, 'already a multiple of 28: unchanged'],
  [1080, 1920, 1092, 1932, '1080p: 38.57 -> 39, 68.57 -> 69'],
  [480, 640, 476, 644, 'VGA: 17.14 -> 17, 22.86 -> 23'],
  [4032, 3024, 4032, 3024, 'phone photo, 12.2 Mpx, under max_pixels'],
  [42, 70, 56, 56, 'half-way cases round to even: 1.5 -> 2, 2.5 -> 2'],
  [98, 98, 112, 112, '3.5 -> 4'],
  [10, 10, 56, 56, 'tiny: rounds to 0x0, scaled up to min_pixels'],
  [1, 1, 56, 56, '1x1'],
  [50, 100, 56, 112, 'below min_pixels after rounding (56x112 > 3136 but 56x84 is not)'],
  [8000, 6000, 4116, 3080, 'huge: scaled down by sqrt(48e6 / max_pixels), floored'],
  [20000, 20000, 3556, 3556, 'huger'],
  [28, 5600, 28, 5600, 'aspect ratio exactly 200 is allowed'],
  [10, 2000, 28, 812, 'aspect 200, thin: height rounds to 0 then ceil-scales'],
  [300, 2, 700, 28, 'tall and 2 px wide'],
  [3, 600, 28, 812, 'aspect 200 at 3 px'],
];

t.test('smart_resize matches HF', async (t) => {
  for (const [h, w, eh, ew, why] of cases) {
    const r = smartResize(h, w);
    t.same(r, { height: eh, width: ew }, `${h}x${w} (HxW): ${why}`);
    t.equal(r.height % 28, 0);
    t.equal(r.width % 28, 0);
  }
});

t.test("llama.cpp's limits give llama.cpp's sizes", async (t) => {
  t.same(smartResize(2000, 2000, LLAMA_CPP_QWEN25VL_LIMITS), { height: 1792, width: 1792 });
  t.same(smartResize(50, 60, LLAMA_CPP_QWEN25VL_LIMITS), { height: 84, width: 112 });
});

t.test('a size smart_resize produced is a fixed point (what llama.cpp relies on)', async (t) => {
  for (const [h, w] of [[1080, 1920], [10, 2000], [8000, 6000], [333, 777]] as const) {
    const once = smartResize(h, w, LLAMA_CPP_QWEN25VL_LIMITS);
    t.same(smartResize(once.height, once.width, LLAMA_CPP_QWEN25VL_LIMITS), once, `${h}x${w}`);
  }
});

t.test('aspect ratio above 200 and bad sizes throw', async (t) => {
  t.throws(() => smartResize(10, 2001), ImageSizeError);
  t.throws(() => smartResize(2001, 10), /aspect ratio must be smaller than 200/);
  t.throws(() => smartResize(0, 10), ImageSizeError);
  t.throws(() => smartResize(10.5, 10), ImageSizeError);
});

t.test('image tokens', async (t) => {
  t.equal(qwenImageTokens(224, 224), 64);
  t.equal(qwenImageTokens(1932, 1092), 69 * 39);
});

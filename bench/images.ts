// Deterministic synthetic images for the captioning benchmark: a colour gradient, a few shapes
// and mild grain, different for every seed (so no server can reuse a cached prompt across
// requests), encoded as JPEG (quality 90) like typical caption traffic.
import sharp from 'sharp';

export interface ImageSize {
  width: number;
  height: number;
}

export function parseSizes(spec: string): ImageSize[] {
  return spec.split(',').map((s) => {
    const m = /^(\d+)x(\d+)$/.exec(s.trim());
    if (!m) throw new Error(`bad image size "${s}" (expected WxH)`);
    const width = Number(m[1]), height = Number(m[2]);
    if (width < 1 || height < 1 || width > 8192 || height > 8192) throw new Error(`image size out of range: ${s}`);
    return { width, height };
  });
}

/** Raw RGB pixels of the synthetic image for `seed`. */
export function syntheticRgb(width: number, height: number, seed: number): Buffer {
  let s = (seed * 2654435761 + 12345) >>> 0;
  const rnd = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
  const c0 = [rnd() * 255, rnd() * 255, rnd() * 255];
  const c1 = [rnd() * 255, rnd() * 255, rnd() * 255];
  const shapes = Array.from({ length: 6 }, () => ({
    kind: rnd() < 0.5 ? 'rect' : 'disc',
    x: rnd() * width, y: rnd() * height,
    r: (0.05 + rnd() * 0.2) * Math.min(width, height),
    color: [rnd() * 255, rnd() * 255, rnd() * 255],
  }));
  const out = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const t = (x / width + y / height) / 2;
      let px = [c0[0] + (c1[0] - c0[0]) * t, c0[1] + (c1[1] - c0[1]) * t, c0[2] + (c1[2] - c0[2]) * t];
      for (const sh of shapes) {
        const dx = x - sh.x, dy = y - sh.y;
        const inside = sh.kind === 'rect' ? Math.abs(dx) < sh.r && Math.abs(dy) < sh.r * 0.6 : dx * dx + dy * dy < sh.r * sh.r;
        if (inside) px = sh.color;
      }
      const grain = (rnd() - 0.5) * 16;
      const o = (y * width + x) * 3;
      out[o] = Math.max(0, Math.min(255, px[0] + grain));
      out[o + 1] = Math.max(0, Math.min(255, px[1] + grain));
      out[o + 2] = Math.max(0, Math.min(255, px[2] + grain));
    }
  }
  return out;
}

/** JPEG data: URI of the synthetic image for `seed`. */
export async function syntheticImageDataUri(size: ImageSize, seed: number): Promise<string> {
  const raw = syntheticRgb(size.width, size.height, seed);
  const jpeg = await sharp(raw, { raw: { width: size.width, height: size.height, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
  return `data:image/jpeg;base64,${jpeg.toString('base64')}`;
}

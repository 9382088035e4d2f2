#!/usr/bin/env python3
"""Compare our reference's HF-order patches with transformers' Qwen2VLImageProcessor (slow, PIL path).

usage: hf-check.py DUMP_DIR      (DUMP_DIR written by `gpu-check --dump DUMP_DIR`)

For each img-WxH.rgb with its patches-WxH-OWxOH.f32 (our stretch mode at llama.cpp's canvas), runs
the HF processor with min/max pixels = llama.cpp's limits; where HF's smart_resize picks the same
canvas the pixel_values must match to float rounding (HF rescales in float64 then casts, we divide
in float32: at most an ulp or so, ~2.4e-7 at |x| <= 2.2); a different canvas is reported and skipped.
Exit 0 = all compared cases match (or nothing to compare), 1 = mismatch, 2 = transformers unavailable.
"""
import glob
import os
import re
import sys

try:
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessor
except Exception as e:  # noqa: BLE001
    print(f"hf-check: skipped, transformers/PIL/numpy not importable ({e})")
    sys.exit(2)


def main():
    d = sys.argv[1]
    try:
        proc = Qwen2VLImageProcessor(min_pixels=8 * 784, max_pixels=4096 * 784)
    except TypeError:
        proc = Qwen2VLImageProcessor(size={"shortest_edge": 8 * 784, "longest_edge": 4096 * 784})
    bad = 0
    n = 0
    for path in sorted(glob.glob(os.path.join(d, "patches-*.f32"))):
        m = re.search(r"patches-(\d+)x(\d+)-(\d+)x(\d+)\.f32$", path)
        w, h, ow, oh = map(int, m.groups())
        rgb = np.fromfile(os.path.join(d, f"img-{w}x{h}.rgb"), dtype=np.uint8).reshape(h, w, 3)
        ours = np.fromfile(path, dtype=np.float32).reshape(-1, 1176)
        out = proc(images=[Image.fromarray(rgb, "RGB")], return_tensors="np")
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        t, gh, gw = (int(x) for x in np.asarray(out["image_grid_thw"])[0])
        if (gw * 14, gh * 14) != (ow, oh):
            print(f"hf-check: {w}x{h}: HF canvas {gw * 14}x{gh * 14} != llama.cpp's {ow}x{oh}, skipped")
            continue
        err = float(np.max(np.abs(pv - ours)))
        ok = pv.shape == ours.shape and err <= 1e-6
        n += 1
        bad += 0 if ok else 1
        print(f"hf-check: {'ok  ' if ok else 'FAIL'} {w}x{h} -> {ow}x{oh}: {pv.shape[0]} patches, max abs err {err:.3g}")
    print(f"hf-check: {n} compared, {bad} mismatched")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

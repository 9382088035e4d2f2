// Writes a GGUF model as llama.cpp's split files (<prefix>-00001-of-00002.gguf, ...), as
// llama-gguf-split does: every file carries split.no / split.count / split.tensors.count, the first
// one all the metadata. The caller picks which tensors go into the second file.
import path from 'node:path';
import { GGUFMetadata, GGUFValueType } from '../../src/model/gguf.js';
import { readGGUF, readTensorBytes } from '../../src/model/gguf-reader.js';
import { GGUFWriter } from '../../src/model/gguf-writer.js';

/** Splits `src` in two under `dir`; returns the first file's path (the one a loader is given). */
export async function splitGGUF(src: string, dir: string, prefix: string, inSecond: (name: string) => boolean): Promise<string> {
  const file = await readGGUF(src);
  const parts = [file.tensors.filter((t) => !inSecond(t.name)), file.tensors.filter((t) => inSecond(t.name))];
  const paths = parts.map((_, i) => path.join(dir, `${prefix}-${String(i + 1).padStart(5, '0')}-of-${String(parts.length).padStart(5, '0')}.gguf`));
  for (const [i, tensors] of parts.entries()) {
    const meta = new GGUFMetadata();
    if (i === 0) for (const [k, v] of file.metadata.entries) meta.set(k, v);
    meta.set('split.no', { type: GGUFValueType.UINT16, value: i });
    meta.set('split.count', { type: GGUFValueType.UINT16, value: parts.length });
    meta.i32('split.tensors.count', file.tensors.length);
    const w = await GGUFWriter.create(paths[i]!, meta, tensors.map((t) => ({ name: t.name, shape: t.shape, type: t.type })));
    for (const t of tensors) await w.writeTensor(t.name, [await readTensorBytes(file, t.name)]);
    await w.finish();
  }
  return paths[0]!;
}

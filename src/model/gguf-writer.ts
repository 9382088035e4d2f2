// Streaming GGUF v3 writer.
//
// Layout (ggml/src/gguf.cpp): header (magic, version, n_tensors, n_kv), KV pairs, tensor infos
// (name, n_dims, ne[], type, offset relative to the data section), zero padding to the
// alignment, then the tensor data, each tensor starting at a multiple of the alignment.
//
// The header is built in memory (it holds the vocabulary: a few MB at most); tensor data is
// streamed to the file tensor by tensor, chunk by chunk, so a model never sits in memory.

import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import {
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUF_VERSION,
  GGUFMetadata,
  GGUFValueType,
  alignUp,
  tensorByteSize,
  type GGUFTensorInfo,
  type GGUFValue,
} from './gguf.js';

/** Growable little-endian byte builder. */
export class ByteBuilder {
  private buf = Buffer.alloc(1 << 16);
  length = 0;

  private ensure(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.length + n) cap *= 2;
    const nb = Buffer.alloc(cap);
    this.buf.copy(nb, 0, 0, this.length);
    this.buf = nb;
  }
  u8(v: number): void { this.ensure(1); this.buf.writeUInt8(v, this.length); this.length += 1; }
  i8(v: number): void { this.ensure(1); this.buf.writeInt8(v, this.length); this.length += 1; }
  u16(v: number): void { this.ensure(2); this.buf.writeUInt16LE(v, this.length); this.length += 2; }
  i16(v: number): void { this.ensure(2); this.buf.writeInt16LE(v, this.length); this.length += 2; }
  u32(v: number): void { this.ensure(4); this.buf.writeUInt32LE(v, this.length); this.length += 4; }
  i32(v: number): void { this.ensure(4); this.buf.writeInt32LE(v, this.length); this.length += 4; }
  f32(v: number): void { this.ensure(4); this.buf.writeFloatLE(v, this.length); this.length += 4; }
  f64(v: number): void { this.ensure(8); this.buf.writeDoubleLE(v, this.length); this.length += 8; }
  u64(v: bigint | number): void { this.ensure(8); this.buf.writeBigUInt64LE(BigInt(v), this.length); this.length += 8; }
  i64(v: bigint | number): void { this.ensure(8); this.buf.writeBigInt64LE(BigInt(v), this.length); this.length += 8; }
  bytes(b: Uint8Array): void { this.ensure(b.length); this.buf.set(b, this.length); this.length += b.length; }
  /** GGUF string: u64 byte length + UTF-8 bytes (no terminator). */
  str(s: string): void {
    const n = Buffer.byteLength(s, 'utf8');
    this.u64(n);
    this.ensure(n);
    this.buf.write(s, this.length, 'utf8');
    this.length += n;
  }
  zeros(n: number): void { this.ensure(n); this.buf.fill(0, this.length, this.length + n); this.length += n; }
  result(): Buffer { return this.buf.subarray(0, this.length); }
}

function writeScalar(b: ByteBuilder, type: GGUFValueType, v: number | bigint | boolean | string, key: string): void {
  switch (type) {
    case GGUFValueType.UINT8: b.u8(v as number); break;
    case GGUFValueType.INT8: b.i8(v as number); break;
    case GGUFValueType.UINT16: b.u16(v as number); break;
    case GGUFValueType.INT16: b.i16(v as number); break;
    case GGUFValueType.UINT32: b.u32(v as number); break;
    case GGUFValueType.INT32: b.i32(v as number); break;
    case GGUFValueType.FLOAT32: b.f32(v as number); break;
    case GGUFValueType.FLOAT64: b.f64(v as number); break;
    case GGUFValueType.UINT64: b.u64(v as bigint); break;
    case GGUFValueType.INT64: b.i64(v as bigint); break;
    case GGUFValueType.BOOL: b.u8(v ? 1 : 0); break;
    case GGUFValueType.STRING:
      if (typeof v !== 'string') throw new Error(`${key}: expected a string, got ${typeof v}`);
      b.str(v);
      break;
    default:
      throw new Error(`${key}: unsupported value type ${type}`);
  }
}

function writeValue(b: ByteBuilder, key: string, v: GGUFValue): void {
  b.u32(v.type);
  if (v.type === GGUFValueType.ARRAY) {
    b.u32(v.itemType);
    b.u64(v.value.length);
    for (const item of v.value) writeScalar(b, v.itemType, item, key);
  } else {
    writeScalar(b, v.type, v.value, key);
  }
}

/** Planned placement of each tensor's data, relative to the data section. */
export interface TensorPlacement extends GGUFTensorInfo {
  offset: number;
  byteSize: number;
}

/**
 * Serialize header + KV + tensor infos, padded to the alignment. Returns the bytes and each
 * tensor's offset/size. `general.alignment` in the metadata, if present, sets the alignment.
 */
export function buildHeader(metadata: GGUFMetadata, tensors: readonly GGUFTensorInfo[]): { header: Buffer; placements: TensorPlacement[]; alignment: number } {
  const alignV = metadata.get('general.alignment');
  let alignment = GGUF_DEFAULT_ALIGNMENT;
  if (alignV) {
    if (alignV.type !== GGUFValueType.UINT32) throw new Error('general.alignment must be a u32');
    alignment = alignV.value;
    if (alignment <= 0 || (alignment & (alignment - 1)) !== 0) throw new Error(`general.alignment must be a power of 2, got ${alignment}`);
  }
  const names = new Set<string>();
  const placements: TensorPlacement[] = [];
  let offset = 0;
  for (const t of tensors) {
    if (names.has(t.name)) throw new Error(`duplicate tensor name ${t.name}`);
    names.add(t.name);
    if (Buffer.byteLength(t.name) >= 64) throw new Error(`tensor name too long for ggml (max 63 bytes): ${t.name}`);
    if (t.shape.length < 1 || t.shape.length > 4) throw new Error(`${t.name}: ggml tensors have 1..4 dims, got ${t.shape.length}`);
    const byteSize = tensorByteSize(t.shape, t.type);
    placements.push({ ...t, shape: [...t.shape], offset, byteSize });
    offset = alignUp(offset + byteSize, alignment);
  }

  const b = new ByteBuilder();
  b.u32(GGUF_MAGIC);
  b.u32(GGUF_VERSION);
  b.u64(tensors.length);
  b.u64(metadata.entries.size);
  for (const [key, v] of metadata.entries) {
    b.str(key);
    writeValue(b, key, v);
  }
  for (const p of placements) {
    b.str(p.name);
    b.u32(p.shape.length);
    for (const d of p.shape) b.u64(d);
    b.u32(p.type);
    b.u64(p.offset);
  }
  b.zeros(alignUp(b.length, alignment) - b.length);
  return { header: b.result(), placements, alignment };
}

/**
 * Chunks of one tensor's data. The writer keeps at most one write in flight: when it asks
 * for the next chunk, every chunk yielded before the previous one has been fully written,
 * so a producer may alternate between two buffers (fill one while the other is written).
 */
export type ChunkSource = Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

/**
 * Writes a GGUF file: `GGUFWriter.create()` writes the header, then `writeTensor()` must be
 * called once per tensor in the planned order, then `finish()`. The file is written under a
 * temporary name and renamed into place by `finish()`; `abort()` removes it.
 */
export class GGUFWriter {
  private next = 0;
  private pos: number;
  private closed = false;
  private readonly zeroPad: Buffer;

  private constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    private readonly tmpPath: string,
    readonly placements: TensorPlacement[],
    readonly alignment: number,
    readonly dataOffset: number,
  ) {
    this.pos = dataOffset;
    this.zeroPad = Buffer.alloc(alignment);
  }

  static async create(path: string, metadata: GGUFMetadata, tensors: readonly GGUFTensorInfo[]): Promise<GGUFWriter> {
    const { header, placements, alignment } = buildHeader(metadata, tensors);
    return GGUFWriter.fromHeader(path, header, placements, alignment);
  }

  /**
   * The same streaming writer for any file laid out as a header followed by tensor data at
   * planned offsets (relative to the end of the header, each padded to `alignment`): a
   * safetensors file is one (src/convert/safetensors.ts, alignment 1).
   */
  static async fromHeader(path: string, header: Uint8Array, placements: TensorPlacement[], alignment: number): Promise<GGUFWriter> {
    const tmpPath = `${path}.partial-${process.pid}`;
    const fh = await open(tmpPath, 'w');
    try {
      await writeAll(fh, header, 0);
    } catch (e) {
      await fh.close().catch(() => {});
      await rm(tmpPath, { force: true });
      throw e;
    }
    return new GGUFWriter(fh, path, tmpPath, placements, alignment, header.length);
  }

  /** Total file size once every tensor is written. */
  get totalSize(): number {
    const last = this.placements[this.placements.length - 1];
    return last ? this.dataOffset + alignUp(last.offset + last.byteSize, this.alignment) : this.dataOffset;
  }

  /** Stream the data of the next tensor (must be `name`); checks the byte count exactly. */
  async writeTensor(name: string, chunks: ChunkSource): Promise<void> {
    if (this.closed) throw new Error('writer is closed');
    const p = this.placements[this.next];
    if (!p) throw new Error(`no more tensors planned, got ${name}`);
    if (p.name !== name) throw new Error(`expected tensor ${p.name} next, got ${name}`);
    const start = this.dataOffset + p.offset;
    if (this.pos !== start) throw new Error(`internal: position ${this.pos} != planned ${start} for ${name}`);
    const end = start + await writeChunks(this.fh, chunks, start, p.byteSize, name);
    const padded = this.dataOffset + alignUp(p.offset + p.byteSize, this.alignment);
    if (padded > end) await writeAll(this.fh, this.zeroPad.subarray(0, padded - end), end);
    this.pos = padded;
    this.next++;
  }

  /** Close and move the file into place; fails if some planned tensor was not written. */
  async finish(): Promise<void> {
    if (this.next !== this.placements.length) {
      throw new Error(`only ${this.next} of ${this.placements.length} tensors written`);
    }
    this.closed = true;
    await this.fh.close();
    await rename(this.tmpPath, this.path);
  }

  /** Close and delete the partial file. */
  async abort(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      await this.fh.close().catch(() => {});
    }
    await rm(this.tmpPath, { force: true });
  }
}

/**
 * Write `chunks` at `start` with at most one write in flight (see ChunkSource); checks that
 * exactly `byteSize` bytes came. Returns the byte count. Shared by every streaming writer.
 */
async function writeChunks(fh: FileHandle, chunks: ChunkSource, start: number, byteSize: number, name: string): Promise<number> {
  let written = 0;
  let pending: Promise<void> | undefined;
  try {
    for await (const chunk of chunks as AsyncIterable<Uint8Array>) {
      if (written + chunk.length > byteSize) throw new Error(`${name}: producer gave more than ${byteSize} bytes`);
      if (pending) await pending;
      pending = writeAll(fh, chunk, start + written);
      written += chunk.length;
    }
  } catch (e) {
    await pending?.catch(() => {}); // never leave a write in flight (or its rejection unhandled)
    throw e;
  }
  if (pending) await pending;
  if (written !== byteSize) throw new Error(`${name}: producer gave ${written} bytes, expected ${byteSize}`);
  return written;
}

async function writeAll(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const { bytesWritten } = await fh.write(data, off, data.length - off, position + off);
    if (bytesWritten <= 0) throw new Error('short write');
    off += bytesWritten;
  }
}

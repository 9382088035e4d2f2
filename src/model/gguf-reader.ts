// Minimal GGUF (v2/v3) reader: parses the header, metadata and tensor infos without loading
// tensor data, and reads/decodes individual tensors on demand. Used by the tests, and meant
// for tools that inspect or convert GGUF files.

import { open, type FileHandle } from 'node:fs/promises';
import {
  GGUF_DEFAULT_ALIGNMENT,
  GGUF_MAGIC,
  GGUFMetadata,
  GGUFValueType,
  GGMLType,
  GGML_TYPE_TRAITS,
  alignUp,
  elementCount,
  type GGUFArray,
  type GGUFValue,
} from './gguf.js';
import { bf16BitsToF32, dequantizeQ8_0, f16BitsToF32 } from './encodings.js';

export interface GGUFReadTensor {
  name: string;
  /** ggml ne[] order: shape[0] is the row length. */
  shape: number[];
  type: number;
  /** Offset relative to the data section. */
  offset: number;
  /** Byte size, or -1 for a type this reader does not know. */
  byteSize: number;
}

export interface GGUFFile {
  path: string;
  version: number;
  metadata: GGUFMetadata;
  tensors: GGUFReadTensor[];
  alignment: number;
  /** Absolute file offset of the data section. */
  dataOffset: number;
}

/** Buffered sequential reader over a file handle. */
class Cursor {
  private buf = Buffer.alloc(0);
  private bufStart = 0; // file offset of buf[0]
  pos = 0; // file offset

  constructor(private readonly fh: FileHandle, private readonly fileSize: number) {}

  private async ensure(n: number): Promise<void> {
    const have = this.bufStart + this.buf.length - this.pos;
    if (have >= n) return;
    if (this.pos + n > this.fileSize) throw new Error(`unexpected end of file at ${this.pos} (+${n})`);
    const want = Math.max(n, 1 << 20);
    const len = Math.min(want, this.fileSize - this.pos);
    const nb = Buffer.alloc(len);
    const { bytesRead } = await this.fh.read(nb, 0, len, this.pos);
    if (bytesRead < n) throw new Error(`short read at ${this.pos}`);
    this.buf = nb.subarray(0, bytesRead);
    this.bufStart = this.pos;
  }
  private at(): number { return this.pos - this.bufStart; }

  async u8(): Promise<number> { await this.ensure(1); const v = this.buf.readUInt8(this.at()); this.pos += 1; return v; }
  async i8(): Promise<number> { await this.ensure(1); const v = this.buf.readInt8(this.at()); this.pos += 1; return v; }
  async u16(): Promise<number> { await this.ensure(2); const v = this.buf.readUInt16LE(this.at()); this.pos += 2; return v; }
  async i16(): Promise<number> { await this.ensure(2); const v = this.buf.readInt16LE(this.at()); this.pos += 2; return v; }
  async u32(): Promise<number> { await this.ensure(4); const v = this.buf.readUInt32LE(this.at()); this.pos += 4; return v; }
  async i32(): Promise<number> { await this.ensure(4); const v = this.buf.readInt32LE(this.at()); this.pos += 4; return v; }
  async f32(): Promise<number> { await this.ensure(4); const v = this.buf.readFloatLE(this.at()); this.pos += 4; return v; }
  async f64(): Promise<number> { await this.ensure(8); const v = this.buf.readDoubleLE(this.at()); this.pos += 8; return v; }
  async u64(): Promise<bigint> { await this.ensure(8); const v = this.buf.readBigUInt64LE(this.at()); this.pos += 8; return v; }
  async i64(): Promise<bigint> { await this.ensure(8); const v = this.buf.readBigInt64LE(this.at()); this.pos += 8; return v; }
  async u64n(): Promise<number> {
    const v = await this.u64();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`u64 ${v} too large`);
    return Number(v);
  }
  async str(): Promise<string> {
    const n = await this.u64n();
    if (n > 1 << 30) throw new Error(`string of ${n} bytes at ${this.pos}`);
    await this.ensure(n);
    const s = this.buf.toString('utf8', this.at(), this.at() + n);
    this.pos += n;
    return s;
  }
}

async function readScalar(c: Cursor, type: GGUFValueType): Promise<number | bigint | boolean | string> {
  switch (type) {
    case GGUFValueType.UINT8: return c.u8();
    case GGUFValueType.INT8: return c.i8();
    case GGUFValueType.UINT16: return c.u16();
    case GGUFValueType.INT16: return c.i16();
    case GGUFValueType.UINT32: return c.u32();
    case GGUFValueType.INT32: return c.i32();
    case GGUFValueType.FLOAT32: return c.f32();
    case GGUFValueType.FLOAT64: return c.f64();
    case GGUFValueType.UINT64: return c.u64();
    case GGUFValueType.INT64: return c.i64();
    case GGUFValueType.BOOL: return (await c.u8()) !== 0;
    case GGUFValueType.STRING: return c.str();
    default: throw new Error(`unknown GGUF value type ${type}`);
  }
}

/** Parse a GGUF file's header, metadata and tensor infos. */
export async function readGGUF(path: string): Promise<GGUFFile> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    const c = new Cursor(fh, size);
    const magic = await c.u32();
    if (magic !== GGUF_MAGIC) throw new Error(`${path}: not a GGUF file (magic 0x${magic.toString(16)})`);
    const version = await c.u32();
    if (version !== 2 && version !== 3) throw new Error(`${path}: unsupported GGUF version ${version}`);
    const nTensors = await c.u64n();
    const nKv = await c.u64n();
    const metadata = new GGUFMetadata();
    for (let i = 0; i < nKv; i++) {
      const key = await c.str();
      const type = (await c.u32()) as GGUFValueType;
      let v: GGUFValue;
      if (type === GGUFValueType.ARRAY) {
        const itemType = (await c.u32()) as GGUFArray['itemType'];
        const n = await c.u64n();
        const value: GGUFArray['value'] = new Array(n);
        for (let j = 0; j < n; j++) value[j] = await readScalar(c, itemType);
        v = { type, itemType, value };
      } else {
        v = { type, value: await readScalar(c, type) } as GGUFValue;
      }
      if (metadata.entries.has(key)) throw new Error(`${path}: duplicate key ${key}`);
      metadata.set(key, v);
    }
    const tensors: GGUFReadTensor[] = [];
    for (let i = 0; i < nTensors; i++) {
      const name = await c.str();
      const nDims = await c.u32();
      const shape: number[] = [];
      for (let d = 0; d < nDims; d++) shape.push(await c.u64n());
      const type = await c.u32();
      const offset = await c.u64n();
      const tr = GGML_TYPE_TRAITS[type as GGMLType];
      const byteSize = tr ? (elementCount(shape) / tr.blockSize) * tr.typeSize : -1;
      tensors.push({ name, shape, type, offset, byteSize });
    }
    const alignV = metadata.get('general.alignment');
    const alignment = alignV && alignV.type === GGUFValueType.UINT32 ? alignV.value : GGUF_DEFAULT_ALIGNMENT;
    const dataOffset = alignUp(c.pos, alignment);
    return { path, version, metadata, tensors, alignment, dataOffset };
  } finally {
    await fh.close();
  }
}

/** Raw bytes of one tensor. */
export async function readTensorBytes(file: GGUFFile, name: string): Promise<Buffer> {
  const t = file.tensors.find((x) => x.name === name);
  if (!t) throw new Error(`${file.path}: no tensor ${name}`);
  if (t.byteSize < 0) throw new Error(`${name}: unsupported type ${t.type}`);
  const fh = await open(file.path, 'r');
  try {
    const buf = Buffer.alloc(t.byteSize);
    const { bytesRead } = await fh.read(buf, 0, t.byteSize, file.dataOffset + t.offset);
    if (bytesRead !== t.byteSize) throw new Error(`${name}: short read`);
    return buf;
  } finally {
    await fh.close();
  }
}

/** Decode a tensor of type F32/F16/BF16/Q8_0 to floats (row-major in ggml order). */
export async function readTensorF32(file: GGUFFile, name: string): Promise<Float32Array> {
  const t = file.tensors.find((x) => x.name === name);
  if (!t) throw new Error(`${file.path}: no tensor ${name}`);
  const raw = await readTensorBytes(file, name);
  const n = elementCount(t.shape);
  const out = new Float32Array(n);
  switch (t.type) {
    case GGMLType.F32:
      for (let i = 0; i < n; i++) out[i] = raw.readFloatLE(i * 4);
      break;
    case GGMLType.F16:
      for (let i = 0; i < n; i++) out[i] = f16BitsToF32(raw.readUInt16LE(i * 2));
      break;
    case GGMLType.BF16:
      for (let i = 0; i < n; i++) out[i] = bf16BitsToF32(raw.readUInt16LE(i * 2));
      break;
    case GGMLType.Q8_0:
      dequantizeQ8_0(raw, 0, n, out, 0);
      break;
    default:
      throw new Error(`${name}: cannot decode type ${t.type}`);
  }
  return out;
}

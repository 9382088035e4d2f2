// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
// {...}}), then the tensor data; offsets are relative to the end of the header. Shapes are in
// PyTorch order (last dimension fastest), the reverse of ggml's ne[].
//
// The reader parses and checks the header only (tensor data is read by offset, chunk by chunk,
// by the converter); the writer streams tensor data through the GGUF writer's machinery.

import { open, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { GGMLType } from '../model/gguf.js';
import { GGUFWriter, type TensorPlacement } from '../model/gguf-writer.js';

/** Element sizes of the safetensors dtypes (all of them, so headers of any checkpoint parse). */
const DTYPE_BYTES: Record<string, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1,
  F8_E4M3: 1, F8_E5M2: 1, F8_E8M0: 1,
};

/** The float dtypes the converter reads, with their ggml type. */
export const FLOAT_DTYPES = { F32: GGMLType.F32, F16: GGMLType.F16, BF16: GGMLType.BF16 } as const;
export type FloatDType = keyof typeof FLOAT_DTYPES;

export interface SafetensorsTensor {
  name: string;
  dtype: string;
  /** PyTorch order. */
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  start: number;
  byteSize: number;
}

export interface SafetensorsHeader {
  path: string;
  /** File size in bytes. */
  size: number;
  /** The raw header (length prefix + JSON), for content hashing. */
  raw: Buffer;
  tensors: Map<string, SafetensorsTensor>;
  metadata: Record<string, string>;
}

/** A checkpoint file that is not what it should be; the message names the file. */
export class CheckpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckpointError';
  }
}

const MAX_HEADER = 100 << 20;

/** Parse and check the header of a safetensors file: every tensor must lie inside the file. */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  const file = basename(path);
  const bad = (m: string): never => {
    throw new CheckpointError(`${file}: ${m}`);
  };
  const { size } = await stat(path);
  if (size < 8) bad(`truncated: ${size} bytes, not even the 8-byte header length of a safetensors file`);
  const fh = await open(path, 'r');
  let raw: Buffer;
  try {
    const len8 = Buffer.alloc(8);
    await fh.read(len8, 0, 8, 0);
    const n = Number(len8.readBigUInt64LE(0));
    if (n > MAX_HEADER) bad(`not a safetensors file (header length ${n} bytes)`);
    if (8 + n > size) bad(`truncated: the header alone needs ${8 + n} bytes but the file has ${size}`);
    raw = Buffer.alloc(8 + n);
    len8.copy(raw);
    const { bytesRead } = await fh.read(raw, 8, n, 8);
    if (bytesRead !== n) bad(`short read of the header`);
  } finally {
    await fh.close();
  }
  let json: unknown;
  try {
    json = JSON.parse(raw.subarray(8).toString('utf8'));
  } catch (e) {
    return bad(`header is not valid JSON (${(e as Error).message})`);
  }
  if (!json || typeof json !== 'object' || Array.isArray(json)) bad('header is not a JSON object');
  const dataStart = raw.length;
  const tensors = new Map<string, SafetensorsTensor>();
  let metadata: Record<string, string> = {};
  for (const [name, v] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      metadata = (v ?? {}) as Record<string, string>;
      continue;
    }
    const e = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (!e || typeof e !== 'object') bad(`tensor ${name}: not an object`);
    const esize = typeof e.dtype === 'string' ? DTYPE_BYTES[e.dtype] : undefined;
    if (esize === undefined) bad(`tensor ${name}: unknown dtype ${JSON.stringify(e.dtype)}`);
    const shape = e.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) bad(`tensor ${name}: bad shape ${JSON.stringify(shape)}`);
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0) || off[1] < off[0]) {
      bad(`tensor ${name}: bad data_offsets ${JSON.stringify(off)}`);
    }
    const [b, end] = off as [number, number];
    const want = (shape as number[]).reduce((a, d) => a * d, 1) * esize!;
    if (end - b !== want) bad(`tensor ${name}: data_offsets span ${end - b} bytes but ${e.dtype} ${JSON.stringify(shape)} needs ${want}`);
    if (dataStart + end > size) {
      bad(`truncated: tensor ${name} ends at byte ${dataStart + end} but the file has ${size} bytes`);
    }
    tensors.set(name, { name, dtype: e.dtype as string, shape: shape as number[], start: dataStart + b, byteSize: want });
  }
  return { path, size, raw, tensors, metadata };
}

export interface SafetensorsPlanEntry {
  name: string;
  dtype: FloatDType;
  /** PyTorch order. */
  shape: number[];
}

/**
 * Create a safetensors file for `tensors` (written in this order, contiguous); stream each
 * tensor's bytes with `writeTensor(name, chunks)`, then `finish()` (renames it into place).
 */
export async function createSafetensors(path: string, tensors: readonly SafetensorsPlanEntry[], metadata: Record<string, string> = {}): Promise<GGUFWriter> {
  const header: Record<string, unknown> = { __metadata__: metadata };
  const placements: TensorPlacement[] = [];
  let offset = 0;
  for (const t of tensors) {
    const byteSize = t.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + byteSize] };
    placements.push({ name: t.name, shape: [...t.shape].reverse(), type: FLOAT_DTYPES[t.dtype], offset, byteSize });
    offset += byteSize;
  }
  let json = JSON.stringify(header);
  // The spec lets the header be padded with spaces; 8-byte alignment keeps the data aligned.
  json += ' '.repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const body = Buffer.from(json, 'utf8');
  const raw = Buffer.alloc(8 + body.length);
  raw.writeBigUInt64LE(BigInt(body.length), 0);
  body.copy(raw, 8);
  return GGUFWriter.fromHeader(path, raw, placements, 1);
}

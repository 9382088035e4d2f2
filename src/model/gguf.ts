// GGUF v3 constants and metadata model, shared by the writer and the reader.
// Reference: ggml/include/gguf.h and ggml/src/gguf.cpp of the pinned llama.cpp.

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

/** Value types of GGUF metadata (enum gguf_type). */
export enum GGUFValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

/** The GGML tensor types this project writes (values of enum ggml_type). */
export enum GGMLType {
  F32 = 0,
  F16 = 1,
  Q8_0 = 8,
  BF16 = 30,
}

/** Elements per block and bytes per block of each type (ggml's type traits). */
export const GGML_TYPE_TRAITS: Record<GGMLType, { name: string; blockSize: number; typeSize: number }> = {
  [GGMLType.F32]: { name: 'f32', blockSize: 1, typeSize: 4 },
  [GGMLType.F16]: { name: 'f16', blockSize: 1, typeSize: 2 },
  [GGMLType.Q8_0]: { name: 'q8_0', blockSize: 32, typeSize: 34 },
  [GGMLType.BF16]: { name: 'bf16', blockSize: 1, typeSize: 2 },
};

export function ggmlTypeName(t: GGMLType | number): string {
  return GGML_TYPE_TRAITS[t as GGMLType]?.name ?? `type${t}`;
}

/** llama_ftype values written as general.file_type. */
export enum LlamaFileType {
  ALL_F32 = 0,
  MOSTLY_F16 = 1,
  MOSTLY_Q8_0 = 7,
  MOSTLY_BF16 = 32,
}

export function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Bytes of a tensor's data. `shape` is in GGUF/ggml order: shape[0] = ne[0] = row length. */
export function tensorByteSize(shape: readonly number[], type: GGMLType): number {
  const tr = GGML_TYPE_TRAITS[type];
  if (!tr) throw new Error(`unsupported ggml type ${type}`);
  if (shape[0] % tr.blockSize !== 0) {
    throw new Error(`row length ${shape[0]} is not a multiple of the ${tr.name} block size ${tr.blockSize}`);
  }
  return (elementCount(shape) / tr.blockSize) * tr.typeSize;
}

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}

/** A scalar metadata value. */
export type GGUFScalar =
  | { type: GGUFValueType.UINT8 | GGUFValueType.INT8 | GGUFValueType.UINT16 | GGUFValueType.INT16; value: number }
  | { type: GGUFValueType.UINT32 | GGUFValueType.INT32 | GGUFValueType.FLOAT32 | GGUFValueType.FLOAT64; value: number }
  | { type: GGUFValueType.UINT64 | GGUFValueType.INT64; value: bigint }
  | { type: GGUFValueType.BOOL; value: boolean }
  | { type: GGUFValueType.STRING; value: string };

/** An array metadata value (arrays of arrays are allowed by GGUF but not needed here). */
export interface GGUFArray {
  type: GGUFValueType.ARRAY;
  itemType: Exclude<GGUFValueType, GGUFValueType.ARRAY>;
  value: Array<number | bigint | boolean | string>;
}

export type GGUFValue = GGUFScalar | GGUFArray;

/** Ordered metadata key/value store with typed setters (keys keep insertion order). */
export class GGUFMetadata {
  readonly entries = new Map<string, GGUFValue>();

  set(key: string, v: GGUFValue): this {
    if (!key) throw new Error('empty metadata key');
    this.entries.set(key, v);
    return this;
  }
  u32(key: string, value: number): this {
    if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) throw new Error(`${key}: ${value} is not a u32`);
    return this.set(key, { type: GGUFValueType.UINT32, value });
  }
  i32(key: string, value: number): this {
    if (!Number.isInteger(value) || value < -0x80000000 || value > 0x7fffffff) throw new Error(`${key}: ${value} is not an i32`);
    return this.set(key, { type: GGUFValueType.INT32, value });
  }
  u64(key: string, value: bigint | number): this {
    return this.set(key, { type: GGUFValueType.UINT64, value: BigInt(value) });
  }
  f32(key: string, value: number): this {
    return this.set(key, { type: GGUFValueType.FLOAT32, value });
  }
  f64(key: string, value: number): this {
    return this.set(key, { type: GGUFValueType.FLOAT64, value });
  }
  bool(key: string, value: boolean): this {
    return this.set(key, { type: GGUFValueType.BOOL, value });
  }
  str(key: string, value: string): this {
    return this.set(key, { type: GGUFValueType.STRING, value });
  }
  arr(key: string, itemType: GGUFArray['itemType'], value: GGUFArray['value']): this {
    return this.set(key, { type: GGUFValueType.ARRAY, itemType, value });
  }
  get(key: string): GGUFValue | undefined {
    return this.entries.get(key);
  }
  /** The plain value of a key (scalar or array), or undefined. */
  value(key: string): unknown {
    return this.entries.get(key)?.value;
  }
}

/** One tensor of a GGUF file: `shape` is ggml's ne[] (shape[0] = fastest-varying = row length). */
export interface GGUFTensorInfo {
  name: string;
  shape: number[];
  type: GGMLType;
}

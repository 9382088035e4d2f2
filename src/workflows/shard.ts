// --shard i/N: which of N machines handles a record. The shard of a record is a stable hash of
// its id (SHA-256, first 8 bytes, modulo N), so it depends on nothing but the id: not on the
// order of the input, the machine, or earlier runs. The N shards partition any input: each id
// falls in exactly one.
import { createHash } from 'node:crypto';

export interface Shard {
  /** 0-based. */
  index: number;
  count: number;
}

export class ShardSpecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ShardSpecError';
  }
}

/** Parses "i/N" (0 <= i < N). */
export function parseShard(spec: string): Shard {
  const m = /^\s*(\d+)\s*\/\s*(\d+)\s*$/.exec(spec);
  if (!m) throw new ShardSpecError(`--shard must look like i/N (e.g. 0/4), got "${spec}"`);
  const index = Number(m[1]);
  const count = Number(m[2]);
  if (!Number.isSafeInteger(count) || count < 1) throw new ShardSpecError(`--shard: N must be at least 1, got ${m[2]}`);
  if (!Number.isSafeInteger(index) || index >= count) {
    throw new ShardSpecError(`--shard: i must be in [0, ${count - 1}] (shards are numbered from 0), got ${m[1]}`);
  }
  return { index, count };
}

/** The shard (0..count-1) a record id belongs to. */
export function shardOf(id: string, count: number): number {
  if (count <= 1) return 0;
  const h = createHash('sha256').update(id, 'utf8').digest();
  return Number(h.readBigUInt64BE(0) % BigInt(count));
}

export function inShard(id: string, shard: Shard | undefined): boolean {
  return !shard || shardOf(id, shard.count) === shard.index;
}

// Loads the compiled addon (built by scripts/build.mjs through cmake-js into build/Release).
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import type { NativeAddon } from './native-types.js';

/** Repository root: this file runs as dist/src/engine/native.js. */
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

let addon: NativeAddon | undefined;

export function loadAddon(): NativeAddon {
  if (addon) return addon;
  const candidates = [
    process.env.CAPRL_ADDON,
    path.join(repoRoot, 'build', 'Release', 'caprl_engine.node'),
  ].filter((p): p is string => !!p);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(`caprl native addon not found (looked in ${candidates.join(', ')}); run \`npm run build\``);
  }
  addon = createRequire(import.meta.url)(found) as NativeAddon;
  return addon;
}

/** Where the llama.cpp tools built beside the addon live (llama-mtmd-cli, llama-server). */
export function llamaBinDir(): string {
  return process.env.CAPRL_LLAMA_BIN_DIR ?? path.join(repoRoot, 'build', 'bin');
}

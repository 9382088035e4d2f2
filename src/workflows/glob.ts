// A small glob matcher and directory walker (Node 20 has no fs.glob):
//   *  any run of characters except "/"     ?  one character except "/"
//   ** any number of whole path segments     [abc] [a-z] [!abc] character classes
//   {a,b,c} alternatives (not nested)
// Walks are depth-first with names sorted, so every listing comes out in one stable order.
// Symbolic links to files are listed; links to folders are not followed (no cycles).
import { promises as fs } from 'node:fs';
import path from 'node:path';

/** Whether a string holds glob syntax. */
export function isGlob(s: string): boolean {
  return /[*?[\]{}]/.test(s);
}

function escapeRe(c: string): string {
  return /[\\^$.*+?()[\]{}|/]/.test(c) ? `\\${c}` : c;
}

/** A regular expression matching whole "/"-separated paths against `pattern`. */
export function globToRegExp(pattern: string): RegExp {
  let re = '';
  let i = 0;
  let inBraces = false;
  while (i < pattern.length) {
    const c = pattern[i]!;
    if (c === '*') {
      if (pattern[i + 1] === '*') {
        // "**/" matches zero or more whole segments; a trailing "**" matches everything below.
        const atSegmentStart = i === 0 || pattern[i - 1] === '/';
        if (atSegmentStart && pattern[i + 2] === '/') {
          re += '(?:[^/]*/)*';
          i += 3;
          continue;
        }
        if (atSegmentStart && i + 2 === pattern.length) {
          re += '.*';
          i += 2;
          continue;
        }
        re += '[^/]*';
        i += 2;
        continue;
      }
      re += '[^/]*';
    } else if (c === '?') {
      re += '[^/]';
    } else if (c === '[') {
      const end = pattern.indexOf(']', i + 2);
      if (end < 0) {
        re += '\\[';
      } else {
        let body = pattern.slice(i + 1, end);
        const negate = body.startsWith('!') || body.startsWith('^');
        if (negate) body = body.slice(1);
        body = body.replace(/\\/g, '\\\\').replace(/\]/g, '\\]');
        re += negate ? `[^/${body}]` : `[${body}]`;
        i = end + 1;
        continue;
      }
    } else if (c === '{' && !inBraces && pattern.indexOf('}', i) > i) {
      inBraces = true;
      re += '(?:';
    } else if (c === ',' && inBraces) {
      re += '|';
    } else if (c === '}' && inBraces) {
      inBraces = false;
      re += ')';
    } else {
      re += escapeRe(c);
    }
    i++;
  }
  return new RegExp(`^${re}$`);
}

/** Splits a pattern into the folder holding no glob syntax and the rest. */
export function globBase(pattern: string): { base: string; rest: string } {
  const parts = pattern.split('/');
  const fixed: string[] = [];
  for (const p of parts) {
    if (isGlob(p)) break;
    fixed.push(p);
  }
  if (fixed.length === parts.length) fixed.pop(); // no glob at all: the last part is the name
  const base = fixed.join('/');
  return { base: base === '' && pattern.startsWith('/') ? '/' : base, rest: parts.slice(fixed.length).join('/') };
}

/**
 * Files under `dir`, recursively, as paths relative to `dir` with "/" separators, depth-first,
 * names sorted by code unit. Unreadable sub-folders are reported through `onError` and skipped.
 */
export async function* walkFiles(dir: string, onError?: (dir: string, err: unknown) => void): AsyncGenerator<string> {
  async function* walk(rel: string): AsyncGenerator<string> {
    let entries;
    try {
      entries = await fs.readdir(path.join(dir, rel), { withFileTypes: true });
    } catch (err) {
      if (rel === '') throw err;
      onError?.(path.join(dir, rel), err);
      return;
    }
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      if (e.isDirectory()) {
        yield* walk(r);
      } else if (e.isFile()) {
        yield r;
      } else if (e.isSymbolicLink()) {
        try {
          if ((await fs.stat(path.join(dir, r))).isFile()) yield r;
        } catch {
          // dangling link: not a file
        }
      }
    }
  }
  yield* walk('');
}

/** Files matching `pattern` (relative to `cwd`, or absolute), in walk order, as `base/relative` paths. */
export async function* expandGlob(pattern: string, cwd = process.cwd()): AsyncGenerator<string> {
  const norm = pattern.split(path.sep).join('/');
  const { base, rest } = globBase(norm);
  const re = globToRegExp(rest);
  const root = path.resolve(cwd, base || '.');
  try {
    if (!(await fs.stat(root)).isDirectory()) return;
  } catch {
    return;
  }
  for await (const rel of walkFiles(root)) {
    if (re.test(rel)) yield base === '' ? rel : base.endsWith('/') ? `${base}${rel}` : `${base}/${rel}`;
  }
}

// No folder of src/ imports another that imports it back, directly or through others: the data
// path reads one way (entrypoints -> workflows -> serving -> engine, images ...). Reads the
// TypeScript sources' relative imports (type-only imports count too) and looks for a cycle in
// the graph of folders.
import t from 'tap';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const src = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'src');

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) return sources(p);
    return name.endsWith('.ts') ? [p] : [];
  });
}

/** folder -> folders it imports from (relative to src/; '.' for src/ itself). */
export function folderGraph(root: string): Map<string, Map<string, string>> {
  const graph = new Map<string, Map<string, string>>();
  // Static imports and re-exports, and dynamic import('...') (the CLI loads its commands so).
  const importRe = /(?:(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+|\bimport\(\s*)['"](\.{1,2}\/[^'"]+)['"]/g;
  for (const file of sources(root)) {
    const from = path.relative(root, path.dirname(file)) || '.';
    const edges = graph.get(from) ?? new Map<string, string>();
    graph.set(from, edges);
    for (const m of readFileSync(file, 'utf8').matchAll(importRe)) {
      const target = path.resolve(path.dirname(file), m[1]!);
      const to = path.relative(root, path.dirname(target)) || '.';
      if (to !== from && !to.startsWith('..') && !edges.has(to)) edges.set(to, `${path.relative(root, file)} imports ${m[1]}`);
    }
  }
  return graph;
}

/** A cycle of folders, as the imports that make it, or null. */
export function findCycle(graph: Map<string, Map<string, string>>): string[] | null {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (node: string): string[] | null => {
    state.set(node, 'open');
    stack.push(node);
    for (const next of graph.get(node)?.keys() ?? []) {
      if (state.get(next) === 'open') {
        const loop = stack.slice(stack.indexOf(next));
        return loop.map((f, i) => graph.get(f)!.get(loop[(i + 1) % loop.length]!)!);
      }
      if (!state.has(next)) {
        const found = visit(next);
        if (found) return found;
      }
    }
    stack.pop();
    state.set(node, 'done');
    return null;
  };
  for (const node of graph.keys()) {
    if (!state.has(node)) {
      const found = visit(node);
      if (found) return found;
    }
  }
  return null;
}

t.test('src/ folders import one way', async (t) => {
  const graph = folderGraph(src);
  t.ok(graph.size >= 8, `${graph.size} folders read`);
  t.ok(graph.get('entrypoints/openai')?.has('serving'), 'the graph holds the imports (entrypoints/openai -> serving)');
  const cycle = findCycle(graph);
  t.equal(cycle, null, cycle ? `a cycle of folders: ${cycle.join('; ')}` : 'no cycle');
});

t.test('the check finds a cycle', async (t) => {
  const graph = new Map([
    ['a', new Map([['b', 'a/x.ts imports ../b/y.js']])],
    ['b', new Map([['c', 'b/y.ts imports ../c/z.js']])],
    ['c', new Map([['a', 'c/z.ts imports ../a/x.js']])],
  ]);
  t.same(findCycle(graph), ['a/x.ts imports ../b/y.js', 'b/y.ts imports ../c/z.js', 'c/z.ts imports ../a/x.js']);
  graph.get('c')!.clear();
  t.equal(findCycle(graph), null);
});

// `npm test`: runs tap over the compiled tests with the TAP reporter, passes its output through,
// and ends with one plain line `N passed, N failed, N skipped` counting each test() in each file
// (a file that fails outside any test counts as one failure).
import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const tapBin = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
const child = spawn(process.execPath, [tapBin, '--reporter=tap', ...process.argv.slice(2)], {
  cwd: root,
  stdio: ['ignore', 'pipe', 'inherit'],
});

let passed = 0, failed = 0, skipped = 0;
let fileFails = 0;
const result = /^(\s*)(not ok|ok) \d+/;
createInterface({ input: child.stdout }).on('line', (line) => {
  process.stdout.write(line + '\n');
  const m = result.exec(line);
  if (!m) return;
  const depth = m[1].length;
  const ok = m[2] === 'ok';
  if (depth === 4) {
    if (/# SKIP/.test(line)) skipped++;
    else if (ok) passed++;
    else { failed++; fileFails++; }
  } else if (depth === 0) {
    if (!ok && fileFails === 0) failed++;
    fileFails = 0;
  }
});
child.on('close', (code) => {
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code === 0 && failed === 0 ? 0 : 1);
});

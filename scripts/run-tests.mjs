// `npm test`: runs tap over the compiled tests with the TAP reporter, passes its output through,
// and ends with one plain line `N passed, N failed, N skipped` counting each test() in each file
// (a file that fails outside any test counts as one failure).
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const tapBin = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
// One folder of generated test models shared by all test files of this run.
const modelsDir = process.env.CAPRL_TEST_MODELS ?? mkdtempSync(path.join(os.tmpdir(), 'caprl-test-models-'));
// Test files: those named on the command line, else every compiled test.
const testDir = path.join('dist', 'test');
const files = process.argv.slice(2).length > 0
  ? process.argv.slice(2)
  : readdirSync(path.join(root, testDir)).filter((f) => f.endsWith('.test.js')).sort().map((f) => path.join(testDir, f));
const child = spawn(process.execPath, [tapBin, '--reporter=tap', ...files], {
  cwd: root,
  env: { ...process.env, CAPRL_TEST_MODELS: modelsDir },
  stdio: ['ignore', 'pipe', 'inherit'],
});

// Counts leaf tests: a subtest with no subtests of its own. Assertions are not counted.
let passed = 0, failed = 0, skipped = 0;
let failsInFile = 0;
const leaf = []; // leaf[level] for the subtest open at that indent level
const result = /^(\s*)(not ok|ok) \d+/;
const subtest = /^(\s*)# Subtest: /;
createInterface({ input: child.stdout }).on('line', (line) => {
  process.stdout.write(line + '\n');
  const st = subtest.exec(line);
  if (st) {
    const level = st[1].length / 4;
    leaf[level] = true;
    if (level > 0) leaf[level - 1] = false;
    return;
  }
  const m = result.exec(line);
  if (!m) return;
  const level = m[1].length / 4;
  const ok = m[2] === 'ok';
  if (level === 0) {
    // A whole test file: if it failed without a failing test inside, count the file itself.
    if (!ok && failsInFile === 0) failed++;
    failsInFile = 0;
    return;
  }
  if (/# SKIP/.test(line)) { skipped++; return; }
  if (!/# time=/.test(line) || !leaf[level]) return; // an assertion, or a test with subtests
  leaf[level] = false;
  if (ok) passed++;
  else { failed++; failsInFile++; }
});
child.on('close', (code) => {
  if (!process.env.CAPRL_TEST_MODELS) rmSync(modelsDir, { recursive: true, force: true });
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code === 0 && failed === 0 && passed > 0 ? 0 : 1);
});

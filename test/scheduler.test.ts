// native/scheduler.cpp with no model: build/bin/caprl-scheduler-check drives it through a fake
// prompt prep, vision worker, runner and output, and checks admission order, slots, KV admission,
// preemption and resume, packing into holes, n choices, chunked images, cancels in each state, a
// decode with no KV room, and the context checks. Each of its lines is one assertion here.
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { llamaBinDir } from '../src/engine/native.js';

const run = promisify(execFile);

t.test('scheduler decisions without a model', async (t) => {
  const bin = path.join(llamaBinDir(), 'caprl-scheduler-check');
  t.ok(existsSync(bin), `${bin} is built with the addon`);
  const { stdout } = await run(bin, [], { maxBuffer: 1 << 20 }).catch((err: { stdout?: string; code?: number }) => {
    t.fail(`caprl-scheduler-check exited ${err.code}`);
    return { stdout: err.stdout ?? '' };
  });
  const lines = stdout.split('\n').filter((l) => /^(ok|not ok) \d+ - /.test(l));
  t.ok(lines.length >= 50, `${lines.length} checks`);
  for (const line of lines) t.ok(line.startsWith('ok '), line.replace(/^(not )?ok \d+ - /, ''));
  t.match(stdout, /# \d+ checks, 0 failed/);
});

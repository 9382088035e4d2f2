// Running llama.cpp's own tools as references. Their logger is an async thread that llama.cpp
// deliberately never flushes at exit (common/log.cpp, common_log_main), so the last lines of
// output, the generated text included, are sometimes lost. A run whose output looks cut is
// run again, up to `tries` times.
import { execFile } from 'node:child_process';

export interface ToolRun {
  code: number;
  stdout: string;
  stderr: string;
}

export function runTool(cmd: string, args: string[], timeoutMs = 60_000): Promise<ToolRun> {
  return new Promise((res) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      res({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** Runs until `complete(run)` holds (or `tries` runs were made) and returns the last run. */
export async function runToolUntil(cmd: string, args: string[], complete: (r: ToolRun) => boolean, tries = 3): Promise<ToolRun> {
  let r = await runTool(cmd, args);
  for (let i = 1; i < tries && r.code === 0 && !complete(r); i++) r = await runTool(cmd, args);
  return r;
}

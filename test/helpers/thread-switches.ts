// Voluntary context switches of every thread of this process (Linux /proc): how often its threads
// blocked. A count, not a time, so a test can tell a decode step that waits from one that computes.
import { readdirSync, readFileSync } from 'node:fs';

export function voluntarySwitches(): number {
  let total = 0;
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const m = /^voluntary_ctxt_switches:\s+(\d+)/m.exec(readFileSync(`/proc/self/task/${tid}/status`, 'utf8'));
      total += m ? Number(m[1]) : 0;
    } catch {
      // the thread ended between the listing and the read
    }
  }
  return total;
}

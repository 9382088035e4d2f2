// Two kinds of failure in a bulk run: a RecordError belongs to one record (a bad image, a
// request the server refuses, a prompt too long) and becomes that record's error; anything
// else (the engine gone, every server unreachable) stops the run, which a rerun resumes.

export class RecordError extends Error {
  constructor(message: string, readonly code: string | null = null, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'RecordError';
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

// Decoded pixels held at once, across requests. An image is decoded whole before it is resized
// (as PIL does), 3 bytes a pixel, so a burst of large images would otherwise hold that much each;
// a decode waits until its bytes fit under the limit (an image larger than the limit waits until
// it is alone). Waiters are served in arrival order.

export class DecodeBudget {
  private held = 0;
  private readonly waiters: { bytes: number; start: () => void }[] = [];
  /** Most bytes held at once so far. */
  peakBytes = 0;

  constructor(readonly limitBytes: number) {}

  /** Waits until `bytes` may be held; returns the release function (call it once). */
  async acquire(bytes: number): Promise<() => void> {
    if (this.waiters.length > 0 || !this.fits(bytes)) {
      await new Promise<void>((start) => this.waiters.push({ bytes, start }));
    } else {
      this.take(bytes);
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.held -= bytes;
      this.wake();
    };
  }

  private fits(bytes: number): boolean {
    return this.held === 0 || this.held + bytes <= this.limitBytes;
  }

  private take(bytes: number): void {
    this.held += bytes;
    this.peakBytes = Math.max(this.peakBytes, this.held);
  }

  private wake(): void {
    while (this.waiters.length > 0 && this.fits(this.waiters[0]!.bytes)) {
      const w = this.waiters.shift()!;
      this.take(w.bytes);
      w.start();
    }
  }
}

/** The server's: 1 GiB of decoded pixels (e.g. two of the largest images allowed, or ~28 12-Mpx photos). */
export const SHARED_DECODE_BUDGET = new DecodeBudget(2 ** 30);

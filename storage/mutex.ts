/** A minimal async mutex: run() executes critical sections one at a time, in call order. */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(fn, fn);
    // A failed section must not poison the ones queued after it.
    this.tail = next.catch(() => undefined);
    return next;
  }
}

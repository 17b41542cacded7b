/**
 * Directory fsyncs shared by the transactions in flight in this process. A create fsyncs the
 * domain's images/ directory twice (after its marker, after its commit rename); with several
 * creates of a lease hold in flight, each asking for its own fsync queues them behind each other
 * (and behind libuv's few threads). Here a caller gets an fsync of the directory that STARTED
 * after its call, so it covers every change the caller made there before calling: the one that
 * starts now if none runs, else the one that starts when the running one ends, shared by every
 * caller that arrived meanwhile. Durability per caller is the same as with its own fsync.
 */
export class SharedDirSync {
  private readonly dirs = new Map<string, { running: Promise<void>; next?: Promise<void> }>();
  /** fsync calls made (tests and benches compare it with the calls asked for). */
  fsyncs = 0;

  /** Resolves after an fsync of `dir` (done by `fsync`) that started after this call; rejects with its error. */
  sync(dir: string, fsync: () => Promise<void>): Promise<void> {
    const state = this.dirs.get(dir);
    if (!state) return this.begin(dir, fsync);
    const ignore = () => undefined;
    state.next ??= state.running.then(ignore, ignore).then(() => this.begin(dir, fsync));
    return state.next;
  }

  private begin(dir: string, fsync: () => Promise<void>): Promise<void> {
    this.fsyncs++;
    const running = Promise.resolve().then(fsync);
    const state = { running };
    this.dirs.set(dir, state);
    const done = () => {
      if (this.dirs.get(dir) === state) this.dirs.delete(dir);
    };
    running.then(done, done);
    return running;
  }
}

/**
 * Imported first by main.ts: sizes libuv's thread pool before anything uses it (it is created
 * on first use, with UV_THREADPOOL_SIZE threads, default 4). Every file step of a transaction
 * (the confined opens, reads, writes, renames, and each fsync, which holds its thread until the
 * storage has the data) runs on that pool; with a lease hold's creates in flight at once, four
 * threads make them wait for each other's fsyncs. An operator's own setting is kept.
 */
process.env.UV_THREADPOOL_SIZE ??= '16';

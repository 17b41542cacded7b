import { spawn } from 'node:child_process';
import path from 'node:path';

/**
 * A copy worker starts for every job, beside the job it replaces on the same cores (issue 17: the
 * copy's fixed cost), so it loads only what it uses (@sdmesh/common/worker): leases, storage, the
 * lease API's messages. Checked on the built worker as the data-mover starts it.
 */
describe('data-mover copy worker modules', () => {
  const workerScript = path.resolve(__dirname, '../../services/data-mover/dist/copy-worker.js');

  /** The files the worker process loaded, as the worker reports them once its module is loaded. */
  async function loadedByWorker(): Promise<string[]> {
    const probe = `require(${JSON.stringify(workerScript)}); process.send(Object.keys(require.cache), () => process.exit(0));`;
    const child = spawn(process.execPath, ['-e', probe], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    return new Promise((resolve, reject) => {
      child.once('message', (files) => resolve(files as string[]));
      child.once('error', reject);
      child.once('exit', (code) => reject(new Error(`the worker exited (${code}) before it reported its modules`)));
    });
  }

  it('loads the lease holder and storage code, not the gRPC server, NATS, metrics or other services contracts', async () => {
    const files = (await loadedByWorker()).map((f) => f.split(path.sep).join('/'));
    const loaded = (pattern: RegExp) => files.filter((f) => pattern.test(f));

    // What a copy needs.
    expect(loaded(/packages\/common\/dist\/lease-holder\.js$/)).toHaveLength(1);
    expect(loaded(/packages\/common\/dist\/storage\/volume-chain\.js$/)).toHaveLength(1);
    expect(loaded(/packages\/common\/dist\/gen\/sdmesh\/v1\/lease_manager\.js$/)).toHaveLength(1);
    expect(loaded(/node_modules\/@grpc\/grpc-js\//).length).toBeGreaterThan(0);

    // What it does not: servers, events, metrics, other contracts.
    expect(loaded(/node_modules\/(@nats-io|prom-client|@grpc\/proto-loader|@grpc\/reflection|grpc-health-check)\//)).toEqual([]);
    expect(loaded(/packages\/common\/dist\/(index|grpc|nats|metrics|authz|service|tls|proto|host-agent)\.js$/)).toEqual([]);
    expect(loaded(/packages\/common\/dist\/gen\/(csi|sdmesh\/v1\/(scheduler|metadata_tx|data_mover|gc|events))/)).toEqual([]);
  });
});

import { spawn } from 'node:child_process';
import path from 'node:path';

/**
 * The gc's lease workers live as long as the gc, 4 of them beside it in the gc container, so each
 * loads only what holding leases needs (@sdmesh/common/worker) and runs with small V8 limits
 * (issue 17: their memory counts against the container's limit). Checked on the built worker.
 */
describe('gc lease worker modules', () => {
  const workerScript = path.resolve(__dirname, '../../services/gc/dist/lease-worker.js');

  /** The files the worker process loaded once its module is loaded (its registration with sanlock, which fails here, is not waited for). */
  async function loadedByWorker(): Promise<string[]> {
    const probe = [
      'const exit = process.exit.bind(process);',
      'process.exit = () => undefined;',
      'console.error = () => undefined;',
      `require(${JSON.stringify(workerScript)});`,
      'process.send(Object.keys(require.cache), () => exit(0));',
    ].join(' ');
    const child = spawn(process.execPath, ['-e', probe], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      env: { ...process.env, SANLOCK_RUN_DIR: '/nonexistent-sdmesh-test' },
    });
    return new Promise((resolve, reject) => {
      child.once('message', (files) => resolve(files as string[]));
      child.once('error', reject);
      child.once('exit', (code) => reject(new Error(`the worker exited (${code}) before it reported its modules`)));
    });
  }

  it('loads the lease holder, not the gRPC server, NATS, metrics, the collector or other contracts', async () => {
    const files = (await loadedByWorker()).map((f) => f.split(path.sep).join('/'));
    const loaded = (pattern: RegExp) => files.filter((f) => pattern.test(f));

    expect(loaded(/packages\/common\/dist\/lease-holder\.js$/)).toHaveLength(1);
    expect(loaded(/packages\/common\/dist\/domain-leases\.js$/)).toHaveLength(1);
    expect(loaded(/services\/gc\/dist\/lease-groups\.js$/)).toHaveLength(1);

    expect(loaded(/node_modules\/(@nats-io|prom-client|@grpc\/proto-loader|@grpc\/reflection|grpc-health-check)\//)).toEqual([]);
    expect(loaded(/packages\/common\/dist\/(index|grpc|nats|metrics|authz|service|tls|proto|host-agent)\.js$/)).toEqual([]);
    expect(loaded(/packages\/common\/dist\/gen\/(csi|sdmesh\/v1\/(scheduler|metadata_tx|data_mover|gc|events))/)).toEqual([]);
    expect(loaded(/services\/gc\/dist\/(collector|gc-service|main|metrics)\.js$/)).toEqual([]);
  });
});

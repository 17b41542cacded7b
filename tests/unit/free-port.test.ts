import fs from 'node:fs';
import net from 'node:net';
import { freePort } from '@sdmesh/localmesh';

test('freePort hands out distinct bindable ports below the kernel ephemeral range (outgoing connections cannot take them)', async () => {
  const ephemeralLow = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
  const ports = await Promise.all(Array.from({ length: 40 }, () => freePort()));
  expect(new Set(ports).size).toBe(ports.length);
  for (const port of ports) expect(port).toBeLessThan(ephemeralLow);
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(ports[0], '127.0.0.1', resolve);
  });
  await new Promise((r) => srv.close(r));
});

test('parallel test workers pick from disjoint slices, so two workers never race for one port', async () => {
  const saved = process.env.JEST_WORKER_ID;
  try {
    const byWorker = new Map<string, number[]>();
    for (const worker of ['1', '2', '3']) {
      process.env.JEST_WORKER_ID = worker;
      byWorker.set(worker, await Promise.all(Array.from({ length: 20 }, () => freePort())));
    }
    const [w1, w2, w3] = [...byWorker.values()].map((ports) => [Math.min(...ports), Math.max(...ports)]);
    // each worker's ports lie in its own slice, in worker order
    expect(w1![1]).toBeLessThan(w2![0]!);
    expect(w2![1]).toBeLessThan(w3![0]!);
  } finally {
    if (saved === undefined) delete process.env.JEST_WORKER_ID;
    else process.env.JEST_WORKER_ID = saved;
  }
});

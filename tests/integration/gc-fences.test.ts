import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fenceFileName, parseFenceName, pb, Reason, SdmeshError } from '@sdmesh/common';
import { encodeFenceRecord } from '../../services/metadata-tx/src/operation-fences';
import { GcMesh, type RunningGc } from '../harness/gc-mesh';

/**
 * Expired operation fences against real parts: one host (real sanlock daemon, lease-manager,
 * metadata-tx), a gc process from services/gc/dist, real files. A pass removes the fences older
 * than the retention, under the domain metadata lease; a live fence (written by FenceOperation) and
 * names that are not fences stay. The metadata-tx, which knew the fences before the pass, sees the
 * removal (the GC's hold of the domain lease bumped its version).
 */
const DAY = 24 * 3600_000;
const T = { timeoutMs: 60000 };
const createReq = (domainPath: string, operationId: string): Partial<pb.CreateVolumeRequest> => ({
  domainPath,
  imageId: randomUUID(),
  volumeId: randomUUID(),
  capacityBytes: 1 << 20,
  format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
  operationId,
});

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: unknown) => SdmeshError.from(e),
  );

describe('gc and operation fences with sanlock', () => {
  const gm = new GcMesh(1);
  let gc: RunningGc | undefined;

  beforeAll(async () => {
    await gm.start();
  });
  afterAll(async () => {
    await gc?.service.process.stop('SIGTERM', 10000);
    await gm.stop();
  });

  it('a pass removes expired fences; a live fence, odd names and foreign files stay', async () => {
    const dom = await gm.formatDomain('fences');
    const mt = gm.mt[0]!;
    const domMd = path.join(dom.path, 'dom_md');
    const [liveOp, expiredOp, tornOp] = [randomUUID(), randomUUID(), randomUUID()];
    await mt.fenceOperation({ domainPath: dom.path, operationId: liveOp }, T);
    const old = Date.now() - 2 * DAY;
    const expired = fenceFileName(expiredOp, old);
    fs.writeFileSync(path.join(domMd, expired), encodeFenceRecord({ domainId: dom.id, operationId: expiredOp, fencedMs: old, hostId: 1 }));
    const torn = fenceFileName(tornOp, old + 1);
    fs.writeFileSync(path.join(domMd, torn), '');
    const odd = ['fence_notes.txt', `fence_${randomUUID().toUpperCase()}_${old}`, `fence_${randomUUID()}_${old}.tx-abc`, `fence_${randomUUID()}_${old}0000000`];
    for (const n of odd) fs.writeFileSync(path.join(domMd, n), 'foreign');
    const fenceNames = () =>
      fs
        .readdirSync(domMd)
        .filter((n) => n.startsWith('fence_'))
        .sort();
    const live = fenceNames().find((n) => parseFenceName(n)?.operationId === liveOp)!;
    expect(live).toBeDefined();

    // The metadata-tx reads the fences (the expired ones too: they fence until removed).
    expect((await errorOf(mt.createVolume(createReq(dom.path, expiredOp), T)))?.reason).toBe(Reason.OPERATION_FENCED);

    gc = await gm.startGc(0, { SDMESH_DOMAINS: dom.path });
    const dry = await gc.client.listGarbage({ domainPath: dom.path }, T);
    // Sorted by path on both sides (the fence names start with random operation ids).
    const byPath = (a: string[], b: string[]) => a[1]!.localeCompare(b[1]!);
    expect(dry.items.map((i) => [i.kind, i.relativePath]).sort(byPath)).toEqual(
      [
        ['expired-fence', `dom_md/${expired}`],
        ['expired-fence', `dom_md/${torn}`],
      ].sort(byPath),
    );
    const { passes } = await gc.client.collectGarbage({ domainPath: dom.path }, T);
    expect(passes).toEqual([
      expect.objectContaining({ collected: true, domainId: dom.id, itemsFound: 2, itemsRemoved: 2, itemsSkipped: 0, errors: [], backlog: 0 }),
    ]);
    expect(passes[0]!.domainLeaseBatches).toBeGreaterThanOrEqual(1);
    expect(fenceNames()).toEqual([live, ...odd].sort());
    const metrics = await (await fetch(`http://127.0.0.1:${gc.service.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/sdmesh_gc_items_removed_total\{kind="expired-fence"[^}]*\} 2/);

    // The metadata-tx sees the removal; the live fence still refuses its operation's create.
    await mt.createVolume(createReq(dom.path, expiredOp), T);
    expect((await errorOf(mt.createVolume(createReq(dom.path, liveOp), T)))?.reason).toBe(Reason.OPERATION_FENCED);
    // Nothing more to collect.
    const again = await gc.client.collectGarbage({ domainPath: dom.path }, T);
    expect(again.passes).toEqual([expect.objectContaining({ collected: true, itemsFound: 0, errors: [] })]);
  });
});

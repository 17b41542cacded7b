import { execFile } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { createClient, pb } from '@sdmesh/common';
import { REPO_ROOT } from '@sdmesh/localmesh';
import { TestLeaseHolder } from '../harness/lease-holder';
import { codeOf, MiB, refusalOf, SchedulerMesh, sha256File, writeRandom } from '../harness/scheduler-mesh';

const run = promisify(execFile);
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const CLONES = 20;
const CAPACITY = 16 * MiB;

/**
 * Templates and thin clones on a real mesh (3 hosts with their own sanlock daemons, nats,
 * qemu-img, files): a template, 20 thin clones written at once from the three hosts under
 * their leases (each clone exclusive, the template shared), guest-visible checksums, the
 * template left as it was, delete refused while clones exist, GC and `sdmctl check` clean;
 * then the refusals (status code, reason, nothing changed).
 */
describe('templates and thin clones', () => {
  const m = new SchedulerMesh(3, {}, { SDMESH_GRACE_MS: '0' });
  const holders: TestLeaseHolder[] = [];
  let dom: pb.StorageDomain;
  let other: pb.StorageDomain;
  let template: pb.Disk;
  let templateBytes: Buffer;
  let sdmctlEnv: NodeJS.ProcessEnv;

  const scheduler = () => m.mesh.credentials({ kind: 'scheduler' });
  const hostClient = <D extends Parameters<typeof createClient>[0]>(def: D, host: number, svc: 'metadata-tx' | 'data-mover' | 'gc') =>
    createClient(def, m.mesh.hosts[host - 1]!.services[svc]!.grpcAddress, scheduler());
  const sdmctl = (...args: string[]) => run(process.execPath, [SDMCTL, ...args], { env: sdmctlEnv, timeout: 120_000 });
  const ref = (d: pb.Disk, domain = dom) => ({ domainPath: domain.path, imageId: d.id, volumeId: d.volumes[d.volumes.length - 1]!.id });
  /** sha256 of a volume's guest-visible content, by the data-mover (which builds the chain from records). */
  const checksum = async (d: pb.Disk, domain = dom): Promise<string> => {
    const mover = hostClient(pb.DataMoverServiceDefinition, 1, 'data-mover');
    try {
      return (await mover.checksumVolume({ volume: ref(d, domain) }, { timeoutMs: 60_000 })).checksum;
    } finally {
      mover.close();
    }
  };
  const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  const collectUntilClean = async (): Promise<number> => {
    const gc = hostClient(pb.GcServiceDefinition, 2, 'gc');
    try {
      let removed = 0;
      for (let i = 0; i < 20; i++) {
        const { passes } = await gc.collectGarbage({ domainPath: dom.path }, { timeoutMs: 120_000 });
        removed += passes.reduce((s, p) => s + p.itemsRemoved, 0);
        if ((await gc.listGarbage({ domainPath: dom.path })).items.length === 0) return removed;
        await new Promise((r) => setTimeout(r, 500));
      }
      throw new Error(`garbage left: ${JSON.stringify((await gc.listGarbage({ domainPath: dom.path })).items.map((i) => i.relativePath))}`);
    } finally {
      gc.close();
    }
  };
  const check = async () => JSON.parse((await sdmctl('check', dom.path, '-o', 'json')).stdout) as { ok: boolean; violations: unknown[]; volumes: number };
  const clonesOf = async (templateId: string) =>
    (await m.api.disks.listDisks({ storageDomainId: dom.id, pageSize: 1000 })).disks.filter((d) => d.templateDiskId === templateId);

  beforeAll(async () => {
    await m.start();
    dom = await m.createDomain('tmpl');
    other = await m.createDomain('tmpl-other');
    sdmctlEnv = {
      PATH: process.env.PATH,
      SDMESH_ADDRESS: m.replicas[0]!.grpcAddress,
      ...m.mesh.nats.clientEnv('sdmctl'),
      ...m.mesh.tlsEnv({ kind: 'user', name: 'admin' }),
      SDMCTL_OUTPUT: '',
    };
    // The template's data, written as a guest would before it became a template.
    template = await m.createDisk(dom.id, CAPACITY, 'template-disk', { description: 'golden image' });
    writeRandom(template.volumes[0]!.path, 0, 8);
    templateBytes = fs.readFileSync(template.volumes[0]!.path);
    for (const i of [0, 1, 2, 0]) holders.push(await TestLeaseHolder.start(m.mesh.hosts[i]!.sanlock.env, `unix:${m.mesh.leaseSocket(m.mesh.hosts[i]!.name)}`));
  }, 180_000);

  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill().catch(() => undefined)));
    await m.stop();
  }, 60_000);

  test('20 thin clones written at once from three hosts: each sees the template plus its own writes; the template is unchanged', async () => {
    // Mark it (sdmctl), and the same request again through the API: the same operation.
    await sdmctl('disks', 'template', '-d', dom.id, template.id, '--request-id', 'mark-template', '--wait');
    const again = await m.api.disks.markDiskTemplate({ requestId: 'mark-template', storageDomainId: dom.id, diskId: template.id });
    expect((await m.wait(again.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect((await m.api.ops.listOperations({ filter: 'type=MARK_DISK_TEMPLATE' })).operations).toHaveLength(1);
    template = await m.api.disks.getDisk({ storageDomainId: dom.id, diskId: template.id });
    expect([template.template, template.volumes[0]!.template, template.templateDiskId]).toEqual([true, true, '']);
    const templateVol = template.volumes[0]!;
    const templateSum = sha256File(templateVol.path);
    // Who touched the template's file: its inode, size, mtime and ctime, as well as its bytes.
    const fileState = (file: string) => {
      const st = fs.statSync(file, { bigint: true });
      return [st.ino, st.size, st.mtimeNs, st.ctimeNs, st.nlink].map(String);
    };
    const templateState = fileState(templateVol.path);
    expect(await checksum(template)).toBe(sha256(templateBytes));

    // 20 thin clones at once (the template locked shared by all of them).
    const ops = await Promise.all(
      Array.from({ length: CLONES }, (_, i) =>
        m.done(m.api.disks.cloneDisk({ requestId: `clone-${i}`, storageDomainId: dom.id, templateDiskId: template.id, description: `clone ${i}` })),
      ),
    );
    const clones = ops.map((op) => (op.result?.$case === 'disk' ? op.result.disk : undefined)!);
    // A retried request: the same operation, no 21st disk.
    expect((await m.api.disks.cloneDisk({ requestId: 'clone-0', storageDomainId: dom.id, templateDiskId: template.id, description: 'clone 0' })).name).toBe(
      ops[0]!.name,
    );
    expect(await clonesOf(template.id)).toHaveLength(CLONES);
    const md = hostClient(pb.MetadataTxServiceDefinition, 3, 'metadata-tx');
    for (const c of clones) {
      const v = c.volumes[0]!;
      expect([c.templateDiskId, c.volumes.length, v.parentId, v.parentImageId, v.format, v.template]).toEqual([
        template.id,
        1,
        templateVol.id,
        template.id,
        pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
        false,
      ]);
      // The overlay names its backing relative to its own image directory, inside the domain.
      const info = await md.getVolume({ domainPath: dom.path, imageId: c.id, volumeId: v.id });
      expect(info.qemuInfo!.backingFilename).toBe(`../${template.id}/${templateVol.id}`);
      expect(v.actualSizeBytes).toBeLessThan(MiB);
    }
    md.close();

    // Writes: host i % 3 holds the template's lease shared and each of its clones' exclusive while qemu-io writes it.
    const leaseOf = (d: pb.Disk) => d.volumes[0]!.lease!;
    for (const h of holders.slice(0, 3)) expect((await h.acquire(leaseOf(template), 'shared', { operationId: 'clone-writes' })).ok).toBe(true);
    const spec = (c: pb.Disk) =>
      'json:' +
      JSON.stringify({
        driver: 'qcow2',
        file: { driver: 'file', filename: c.volumes[0]!.path },
        backing: { driver: 'raw', file: { driver: 'file', filename: templateVol.path } },
      });
    await Promise.all(
      clones.map(async (c, i) => {
        const holder = holders[i % 3]!;
        const got = await holder.acquire(leaseOf(c), 'exclusive', { operationId: `write-${i}` });
        if (!got.ok) throw new Error(`lease of clone ${i}: ${got.error.message}`);
        try {
          await run('qemu-io', ['-c', `write -P ${i + 1} 4M 1M`, '-c', `write -P ${i + 101} 12M 1M`, spec(c)]);
        } finally {
          await holder.release(leaseOf(c));
        }
      }),
    );
    // No one can take the template's lease exclusively (to write it) while the clones' writers hold it shared.
    const blocked = await holders[3]!.acquire(leaseOf(template), 'exclusive');
    expect(blocked.ok ? 'OK' : 'refused').toBe('refused');
    for (const h of holders.slice(0, 3)) expect((await h.release(leaseOf(template))).ok).toBe(true);

    // Each clone: the template's bytes, with its own two writes.
    const sums = await Promise.all(clones.map((c) => checksum(c)));
    clones.forEach((_, i) => {
      const expected = Buffer.from(templateBytes);
      expected.fill(i + 1, 4 * MiB, 5 * MiB);
      expected.fill(i + 101, 12 * MiB, 13 * MiB);
      expect(sums[i]).toBe(sha256(expected));
    });
    expect(new Set(sums).size).toBe(CLONES);
    expect(sha256File(templateVol.path)).toBe(templateSum);
    expect(fileState(templateVol.path)).toEqual(templateState);

    // Events and metrics: each clone's steps and end were published; the operations are counted by type.
    for (const op of ops) {
      const seen = m.operationEvents(op.name);
      expect(seen.map((e) => e.step)).toContain('create-clone');
      expect(seen.map((e) => e.status)).toContain(pb.OperationStatus.OPERATION_STATUS_DONE);
    }
    const exposition = await m.metrics(m.replicas[0]!);
    // Exactly once each: a resume scan never runs an operation a second time (it once re-finished ones that had just ended).
    const cloneDone = Number(/^sdmesh_scheduler_operations_total\{type="CLONE_DISK",outcome="done"[^}]*\} (\d+)$/m.exec(exposition)?.[1] ?? 0);
    expect(cloneDone).toBe(CLONES);
    expect(exposition).toMatch(/^sdmesh_scheduler_operations_total\{type="MARK_DISK_TEMPLATE",outcome="done"[^}]*\} [1-9]\d*$/m);
    // A clone copied flattened is an ordinary disk with the same content; a full clone has the template's.
    const flat = await m.done(
      m.api.disks.copyDisk({ requestId: 'flatten-0', storageDomainId: dom.id, diskId: clones[0]!.id, targetStorageDomainId: other.id, collapse: true }),
    );
    const flatDisk = flat.result?.$case === 'disk' ? flat.result.disk : undefined;
    expect([flatDisk!.templateDiskId, flatDisk!.volumes.length, await checksum(flatDisk!, other)]).toEqual(['', 1, sums[0]]);
    const full = await m.done(
      m.api.disks.cloneDisk({
        requestId: 'full-clone',
        storageDomainId: dom.id,
        templateDiskId: template.id,
        mode: pb.CloneMode.CLONE_MODE_FULL,
        targetStorageDomainId: other.id,
      }),
    );
    const fullDisk = full.result?.$case === 'disk' ? full.result.disk : undefined;
    expect([fullDisk!.templateDiskId, fullDisk!.template, await checksum(fullDisk!, other)]).toEqual(['', false, sha256(templateBytes)]);

    // The template can't be deleted under its clones: not by the API, not by metadata-tx directly.
    const refused = await refusalOf(m.api.disks.deleteDisk({ requestId: 'delete-template-early', storageDomainId: dom.id, diskId: template.id }));
    expect(refused.slice(0, 2)).toEqual(['FAILED_PRECONDITION', 'TEMPLATE_HAS_CLONES']);
    expect(refused[2]).toMatch(/20 thin clone/);
    const mdDirect = hostClient(pb.MetadataTxServiceDefinition, 2, 'metadata-tx');
    const direct = await refusalOf(mdDirect.deleteImage({ domainPath: dom.path, imageId: template.id, operationId: 'direct' }));
    mdDirect.close();
    expect(direct.slice(0, 2)).toEqual(['FAILED_PRECONDITION', 'TEMPLATE_HAS_CLONES']);

    // A domain with a template and its clones is consistent, and has no garbage to take.
    const live = await check();
    expect([live.ok, live.violations]).toEqual([true, []]);
    expect(await collectUntilClean()).toBe(0);
    expect(sha256File(templateVol.path)).toBe(templateSum);
    expect(fileState(templateVol.path)).toEqual(templateState);

    // Delete the clones; the GC collects them and leaves the template's volume alone.
    await Promise.all(clones.map((c, i) => m.done(m.api.disks.deleteDisk({ requestId: `delete-clone-${i}`, storageDomainId: dom.id, diskId: c.id }))));
    expect(await collectUntilClean()).toBeGreaterThanOrEqual(CLONES);
    for (const c of clones) expect(fs.existsSync(path.dirname(c.volumes[0]!.path))).toBe(false);
    expect(sha256File(templateVol.path)).toBe(templateSum);
    expect(fileState(templateVol.path)).toEqual(templateState);
    expect(await checksum(template)).toBe(sha256(templateBytes));
    const after = await check();
    expect([after.ok, after.violations]).toEqual([true, []]);

    // Now it can go.
    await m.done(m.api.disks.deleteDisk({ requestId: 'delete-template', storageDomainId: dom.id, diskId: template.id }));
    await collectUntilClean();
    expect(fs.existsSync(templateVol.path)).toBe(false);
    expect((await check()).ok).toBe(true);
  }, 300_000);

  test('refusals: the right code and reason, nothing changed', async () => {
    const plain = await m.createDisk(dom.id, MiB, 'plain-disk');
    const tmpl = await m.createDisk(dom.id, MiB, 'second-template');
    await m.done(m.api.disks.markDiskTemplate({ requestId: 'mark-second', storageDomainId: dom.id, diskId: tmpl.id }));
    // The clone through sdmctl (by domain name), then its operation as the API reports it.
    await sdmctl('disks', 'clone', '-d', 'tmpl', tmpl.id, '--mode', 'thin', '--request-id', 'second-clone', '--wait');
    const clone = await m.api.disks.cloneDisk({
      requestId: 'second-clone',
      storageDomainId: dom.id,
      templateDiskId: tmpl.id,
      mode: pb.CloneMode.CLONE_MODE_THIN,
    });
    expect(clone.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const cloneDisk = clone.result?.$case === 'disk' ? clone.result.disk : undefined;
    expect(cloneDisk!.templateDiskId).toBe(tmpl.id);
    expect((await sdmctl('disks', 'list', '-d', 'tmpl')).stdout).toMatch(new RegExp(`${cloneDisk!.id}.*clone of ${tmpl.id.slice(0, 8)}`));
    const chain = await m.createDisk(dom.id, MiB, 'chain-disk');
    await m.done(m.api.disks.snapshotDisk({ requestId: 'chain-snap', storageDomainId: dom.id, diskId: chain.id }));
    const illegal = await m.createDisk(dom.id, MiB, 'illegal-disk');
    const md = hostClient(pb.MetadataTxServiceDefinition, 1, 'metadata-tx');
    await md.updateVolume({
      domainPath: dom.path,
      imageId: illegal.id,
      volumeId: illegal.volumes[0]!.id,
      generation: 0,
      legality: pb.Legality.LEGALITY_ILLEGAL,
    });

    const disksBefore = (await m.api.disks.listDisks({ storageDomainId: dom.id, pageSize: 1000 })).disks.map((d) => pb.Disk.toJSON({ ...d, volumes: [] }));
    const opsBefore = (await m.api.ops.listOperations({ pageSize: 1000 })).operations.length;
    const templateSum = sha256File(tmpl.volumes[0]!.path);
    const clone1 = (req: Partial<pb.CloneDiskRequest>) =>
      codeOf(m.api.disks.cloneDisk({ requestId: `bad-${randomUUID()}`, storageDomainId: dom.id, templateDiskId: tmpl.id, ...req }));
    const mark = (diskId: string) => codeOf(m.api.disks.markDiskTemplate({ requestId: `bad-${randomUUID()}`, storageDomainId: dom.id, diskId }));

    expect(await clone1({ templateDiskId: randomUUID() })).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    expect(await clone1({ storageDomainId: other.id })).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']); // the template is in another domain
    expect(await clone1({ templateDiskId: plain.id })).toEqual(['FAILED_PRECONDITION', 'NOT_A_TEMPLATE']);
    expect(await clone1({ templateDiskId: cloneDisk!.id })).toEqual(['FAILED_PRECONDITION', 'NOT_A_TEMPLATE']);
    expect(await clone1({ targetStorageDomainId: other.id })).toEqual(['INVALID_ARGUMENT', 'THIN_CLONE_OTHER_DOMAIN']);
    expect(await clone1({ mode: 7 as pb.CloneMode })).toEqual(['INVALID_ARGUMENT', 'INVALID_CLONE_MODE']);
    expect(await clone1({ templateDiskId: `../${tmpl.id}` })).toEqual(['INVALID_ARGUMENT', 'INVALID_DISK_ID']);
    expect(await clone1({ description: 'x'.repeat(5000) })).toEqual(['INVALID_ARGUMENT', 'TEXT_TOO_LONG']);
    expect(await mark(randomUUID())).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    expect(await mark(chain.id)).toEqual(['FAILED_PRECONDITION', 'TEMPLATE_NOT_SINGLE_VOLUME']);
    expect(await mark(cloneDisk!.id)).toEqual(['FAILED_PRECONDITION', 'DISK_IS_CLONE']);
    expect(await mark(illegal.id)).toEqual(['FAILED_PRECONDITION', 'DISK_ILLEGAL']);
    // A template is read-only: no snapshot, no move, no write job; a clone moves or copies only flattened.
    expect(await codeOf(m.api.disks.snapshotDisk({ requestId: 'bad-snap', storageDomainId: dom.id, diskId: tmpl.id }))).toEqual([
      'FAILED_PRECONDITION',
      'DISK_IS_TEMPLATE',
    ]);
    expect(await codeOf(m.api.disks.moveDisk({ requestId: 'bad-move', storageDomainId: dom.id, diskId: tmpl.id, targetStorageDomainId: other.id }))).toEqual([
      'FAILED_PRECONDITION',
      'DISK_IS_TEMPLATE',
    ]);
    expect(
      await codeOf(m.api.disks.copyDisk({ requestId: 'bad-copy', storageDomainId: dom.id, diskId: cloneDisk!.id, targetStorageDomainId: other.id })),
    ).toEqual(['FAILED_PRECONDITION', 'DISK_IS_CLONE']);
    expect(await codeOf(m.api.disks.deleteDisk({ requestId: 'bad-delete', storageDomainId: dom.id, diskId: tmpl.id }))).toEqual([
      'FAILED_PRECONDITION',
      'TEMPLATE_HAS_CLONES',
    ]);
    // The storage refuses too, whoever asks: a snapshot through metadata-tx, a copy job into the template.
    expect(
      await codeOf(
        md.createVolume({
          domainPath: dom.path,
          imageId: tmpl.id,
          volumeId: randomUUID(),
          parentId: tmpl.volumes[0]!.id,
          format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
        }),
      ),
    ).toEqual(['FAILED_PRECONDITION', 'DISK_IS_TEMPLATE']);
    const mover = hostClient(pb.DataMoverServiceDefinition, 2, 'data-mover');
    expect(
      await codeOf(
        mover.copyVolume(
          pb.CopyVolumeRequest.fromPartial({ jobId: randomUUID(), source: ref(plain), destination: ref(tmpl), destinationGeneration: 0, collapse: true }),
        ),
      ),
    ).toEqual(['FAILED_PRECONDITION', 'DISK_IS_TEMPLATE']);
    mover.close();
    md.close();

    const disksAfter = (await m.api.disks.listDisks({ storageDomainId: dom.id, pageSize: 1000 })).disks.map((d) => pb.Disk.toJSON({ ...d, volumes: [] }));
    expect(disksAfter).toEqual(disksBefore);
    expect((await m.api.ops.listOperations({ pageSize: 1000 })).operations.length).toBe(opsBefore);
    expect(sha256File(tmpl.volumes[0]!.path)).toBe(templateSum);
    expect(pb.Disk.toJSON(await m.api.disks.getDisk({ storageDomainId: dom.id, diskId: tmpl.id }))).toMatchObject({ template: true });
  }, 180_000);
});

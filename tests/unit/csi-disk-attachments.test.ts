import { pb, SdmeshError } from '@sdmesh/common';
import { DiskAttachments } from '../../services/scheduler/src/attachments';
import type { Cluster } from '../../services/scheduler/src/cluster';
import { MemoryKvStore } from '../../services/scheduler/src/kv-store';
import { SchedulerMetrics } from '../../services/scheduler/src/metrics';
import { Registry } from 'prom-client';

/** The scheduler's attach records on an in-memory KV, with a fake cluster (hosts, one disk). */
const DOMAIN = '0b4c3e2a-1111-4222-8333-444455556666';
const DISK = '7f00aa11-2222-4333-8444-555566667777';
const { ATTACHMENT_MODE_EXCLUSIVE: EXCLUSIVE, ATTACHMENT_MODE_SHARED: SHARED } = pb.AttachmentMode;

function setup() {
  const leaf = { id: 'leaf-volume', generation: 3, legality: pb.Legality.LEGALITY_LEGAL };
  const hosts = new Map(['h1', 'h2', 'h3'].map((name) => [name, { healthy: true, liveness: new Map<string, pb.HostLiveness>() }]));
  const bumps: pb.UpdateVolumeRequest[] = [];
  const cluster = {
    domains: { get: async (id: string) => ({ id, path: '/storage/d', maintenance: false, removing: false }) },
    hosts: { get: (name: string) => hosts.get(name), reaches: () => true },
    volumes: async () => [{ ...leaf }],
    read: async (_ids: string[], fn: (h: unknown) => Promise<unknown>) =>
      fn({
        clients: {
          metadata: {
            updateVolume: async (req: pb.UpdateVolumeRequest) => {
              bumps.push(req);
              leaf.generation++;
              return { ...leaf };
            },
          },
        },
      }),
  } as unknown as Cluster;
  const events: pb.DiskAttachmentEvent[] = [];
  const publisher = { publish: (p: { diskAttachment: pb.DiskAttachmentEvent }) => events.push(p.diskAttachment) };
  const log = { info: () => undefined } as never;
  const metrics = new SchedulerMetrics(new Registry());
  const att = new DiskAttachments({ kv: new MemoryKvStore(), cluster, events: publisher as never, log, metrics });
  const publish = (host: string, mode = EXCLUSIVE, readonly = false) => att.publish({ storageDomainId: DOMAIN, diskId: DISK, host, mode, readonly }, {});
  const unpublish = (host = '') => att.unpublish({ storageDomainId: DOMAIN, diskId: DISK, host }, {});
  const refusal = async (p: Promise<unknown>) => p.then(() => 'OK').catch((e: SdmeshError) => e.reason);
  const changes = async () => Object.fromEntries((await metrics.attachmentChanges.get()).values.map((v) => [v.labels.change, v.value]));
  return { att, hosts, bumps, events, leaf, publish, unpublish, refusal, changes };
}

describe('disk attachments (scheduler)', () => {
  it('lets exactly one of two racing exclusive publishes win', async () => {
    const { publish, refusal, att } = setup();
    const results = await Promise.all([refusal(publish('h1')), refusal(publish('h2'))]);
    expect(results.sort()).toEqual(['ATTACHED_TO_ANOTHER_HOST', 'OK']);
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments).toHaveLength(1);
  });

  it('is idempotent per host, refuses another mode there, and shares only among shared attachments', async () => {
    const { publish, refusal, att } = setup();
    const first = await publish('h1', SHARED);
    expect(first).toMatchObject({ host: 'h1', mode: SHARED, leafVolumeId: 'leaf-volume', generation: 3 });
    expect(await publish('h1', SHARED)).toEqual(first);
    expect(await refusal(publish('h1', SHARED, true))).toBe('ATTACHMENT_MISMATCH');
    expect(await refusal(publish('h2', SHARED))).toBe('OK');
    expect(await refusal(publish('h3', EXCLUSIVE))).toBe('ATTACHED_TO_ANOTHER_HOST');
    expect(await refusal(publish('nobody'))).toBe('HOST_NOT_FOUND');
    expect(await refusal(att.publish({ storageDomainId: DOMAIN, diskId: DISK, host: 'h3', mode: 0, readonly: false }, {}))).toBe('INVALID_ATTACHMENT_MODE');
    expect((await att.list({ storageDomainId: DOMAIN, diskId: DISK, host: '' })).attachments.map((a) => a.host)).toEqual(['h1', 'h2']);
  });

  it('unpublishes a host that does not answer only once sanlock calls it dead, bumping the generation', async () => {
    const { publish, unpublish, refusal, hosts, bumps, events, att, changes } = setup();
    await publish('h2');
    hosts.get('h2')!.healthy = false;
    for (const l of [undefined, pb.HostLiveness.HOST_LIVENESS_LIVE, pb.HostLiveness.HOST_LIVENESS_FAILING]) {
      if (l !== undefined) hosts.get('h2')!.liveness.set(DOMAIN, l);
      expect(await refusal(unpublish('h2'))).toBe('HOST_NOT_DEAD');
    }
    expect(bumps).toEqual([]);
    hosts.get('h2')!.liveness.set(DOMAIN, pb.HostLiveness.HOST_LIVENESS_DEAD);
    expect(await unpublish('h2')).toEqual({ hosts: ['h2'], fencedGeneration: 4 });
    expect(bumps).toEqual([expect.objectContaining({ volumeId: 'leaf-volume', generation: 3, bumpGeneration: true })]);
    expect(events.map((e) => e.kind)).toEqual([pb.DiskAttachmentEvent_Kind.KIND_PUBLISHED, pb.DiskAttachmentEvent_Kind.KIND_FENCED]);
    expect(await unpublish('h2')).toEqual({ hosts: [], fencedGeneration: 0 });
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments).toEqual([]);
    expect((await publish('h1')).generation).toBe(4);
    expect(await changes()).toEqual({ published: 2, unpublished: 0, fenced: 1, refused_not_dead: 3 });
  });

  it('fences only the dead host of an unpublish of several: the one that answers is unpublished plainly', async () => {
    const { publish, unpublish, hosts, events, changes } = setup();
    await publish('h1', SHARED);
    await publish('h2', SHARED);
    hosts.get('h1')!.healthy = false;
    hosts.get('h1')!.liveness.set(DOMAIN, pb.HostLiveness.HOST_LIVENESS_DEAD);
    expect(await unpublish()).toEqual({ hosts: ['h1', 'h2'], fencedGeneration: 4 });
    expect(events.slice(2).map((e) => [e.host, e.kind, e.generation])).toEqual([
      ['h1', pb.DiskAttachmentEvent_Kind.KIND_FENCED, 4],
      ['h2', pb.DiskAttachmentEvent_Kind.KIND_UNPUBLISHED, 3],
    ]);
    expect(await changes()).toMatchObject({ published: 2, unpublished: 1, fenced: 1 });
  });
});

import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { createClient, DomainLayout, pb, SdmeshError } from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';
import type { DomainLeaseProvider, DomainRef } from '../../services/metadata-tx/src/leases';
import { TestLeaseHolder } from './lease-holder';
import { makeTestDir, removeTestDir } from './paths';

/**
 * Two hosts (each a sanlock daemon, a lease-manager and a metadata-tx) sharing one formatted
 * domain whose lockspace both have joined, and a lease holder process on each: for tests of how
 * metadata-tx's group commit takes the domain metadata lease (DomainLeaseGroups run in the test,
 * the lease taken by the holder processes through real sanlock).
 */
export class DomainLeaseHosts {
  readonly holders: TestLeaseHolder[] = [];
  readonly domain: DomainRef;
  /** The domain metadata lease (slot 0 of dom_md/leases). */
  readonly sdm: pb.LeaseLocation;

  private constructor(
    readonly mesh: LocalMesh,
    private readonly dir: string,
  ) {
    const domainPath = path.join(dir, 'storage', 'dom1');
    this.domain = { id: randomUUID(), path: domainPath };
    this.sdm = { lockspace: this.domain.id, resource: 'SDM', path: new DomainLayout(domainPath).leasesPath, offset: 0 };
  }

  static async start(prefix: string): Promise<DomainLeaseHosts> {
    const dir = makeTestDir(prefix);
    const mesh = new LocalMesh({ dir, hosts: 2, perHostServices: ['lease-manager', 'metadata-tx'], scheduler: false, logLevel: 'warn' });
    const hosts = new DomainLeaseHosts(mesh, dir);
    await mesh.start();
    const { id: domainId, path: domainPath } = hosts.domain;
    const clients = mesh.hosts.map((h) =>
      createClient(pb.MetadataTxServiceDefinition, h.services['metadata-tx']!.grpcAddress, mesh.credentials({ kind: 'scheduler' })),
    );
    await clients[0]!.formatDomain({ domainId, name: 'dom1', path: domainPath, ioTimeoutSeconds: 2 }, { timeoutMs: 60000 });
    // A create from each host joins its lease-manager to the domain's lockspace.
    for (const c of clients) {
      await c.createVolume(
        { domainPath, imageId: randomUUID(), volumeId: randomUUID(), format: pb.VolumeFormat.VOLUME_FORMAT_RAW, capacityBytes: 1 << 20 },
        { timeoutMs: 120000 },
      );
      c.close();
    }
    for (const h of mesh.hosts) hosts.holders.push(await TestLeaseHolder.start(h.sanlock.env, `unix:${mesh.leaseSocket(h.name)}`));
    return hosts;
  }

  async stop(): Promise<void> {
    await Promise.all(this.holders.map((h) => h.kill()));
    await this.mesh.stop();
    removeTestDir(this.dir);
  }

  /**
   * Host n's (0-based) domain lease as tryDomainLease, taken and given back by its lease holder
   * process; onTry and onRefused are told of each try and each refusal (after the refusal came).
   */
  providerOf(n: number, opts: { requestIfHeld?: boolean; onTry?: () => void; onRefused?: () => void } = {}): DomainLeaseProvider {
    const holder = this.holders[n]!;
    return {
      tryDomainLease: async <T>(_d: unknown, _op: string, fn: (hold: { lver?: number }) => Promise<T>) => {
        opts.onTry?.();
        const got = await holder.acquire(this.sdm, 'exclusive', { wait: false, requestIfHeld: opts.requestIfHeld });
        if (!got.ok) {
          opts.onRefused?.();
          throw new SdmeshError(got.error.code, got.error.message, got.error.reason);
        }
        try {
          return await fn({ lver: got.result.lver });
        } finally {
          await holder.release(this.sdm);
        }
      },
      withDomainLease: () => Promise.reject(new Error('not used: the groups poll with tryDomainLease')),
      tryVolumeLease: () => Promise.reject(new Error('not used')),
      formatLeaseSlot: () => Promise.reject(new Error('not used')),
      formatDomainLeases: () => Promise.reject(new Error('not used')),
    };
  }
}

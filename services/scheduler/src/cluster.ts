import {
  DomainLayout,
  failedPrecondition,
  GrpcStatus,
  notFound,
  pb,
  Reason,
  resourceExhausted,
  SdmeshError,
  sleepUnlessAborted,
  unavailable,
  type CallOptions,
  type EventPublisher,
  type Logger,
} from '@sdmesh/common';
import type { DomainEntry, DomainRegistry } from './domains';
import type { HostRegistry, HostState } from './hosts';
import { CALL_TIMEOUT_MS, isHostUnreachable } from './policies';

/**
 * What bounds a call beyond its own timeout: the incoming request's deadline and abort signal
 * (a handler), or the operation's signal (a step).
 */
export type CallBound = Pick<CallOptions, 'deadline' | 'signal'>;

/** Call options: the call's own timeout, never past the bound's deadline, aborted with its signal. */
export const bounded = (bound: CallBound | undefined, timeoutMs: number): CallOptions => ({ deadline: bound?.deadline, signal: bound?.signal, timeoutMs });

/** Sleeps, or rejects with the signal's reason when it aborts first. */
export const sleep = sleepUnlessAborted;

/** How long a read keeps trying the healthy hosts when none answers (ms). */
export const READ_RETRY_MS = 10_000;

/** Reading domains and disks from storage (through any healthy host's metadata-tx) and low-space checks. */
export class Cluster {
  private lowSpace = new Map<string, 'ok' | 'warning' | 'critical'>();
  private rr = 0;
  /** Whether this replica has seen a healthy host yet (its first host poll may still be running). */
  private sawHealthyHost = false;

  constructor(
    readonly hosts: HostRegistry,
    readonly domains: DomainRegistry,
    private readonly events: EventPublisher,
    readonly log: Logger,
  ) {}

  /** A healthy host for a read (round robin; not counted as a placement). */
  reader(domainIds: string[] = []): HostState {
    const all = this.hosts.healthy().filter((h) => domainIds.every((d) => this.hosts.reaches(h, d)));
    if (all.length === 0) throw unavailable('no healthy host to read storage through', Reason.NO_HOST);
    return all[this.rr++ % all.length]!;
  }

  /** Runs a read on a healthy host, trying the others if one does not answer. */
  async read<T>(domainIds: string[], fn: (h: HostState) => Promise<T>): Promise<T> {
    await this.firstHealthyHost();
    let last: unknown;
    const tried = new Set<HostState>();
    // Rounds over the healthy hosts for a few seconds: when every host's metadata-tx is down at
    // once (restarting, fenced by a lost lockspace), a closing read right after a committed step
    // failed the operation, its effect done (chaos seed 22: a MarkDiskTemplate FAILED UNAVAILABLE,
    // the disk a template).
    const until = Date.now() + READ_RETRY_MS;
    for (let i = 0; ; i++) {
      // Concurrent reads share the round robin: without this, one read could ask the same host (a
      // service of it restarting) every time, and an operation whose data step had already committed
      // failed on its closing read (found by the chaos run, seed 16: an ExtendDisk FAILED, the disk grown).
      let h: HostState | undefined;
      try {
        h = this.reader(domainIds);
        for (let pick = 0; pick < 16 && tried.has(h); pick++) h = this.reader(domainIds);
      } catch (err) {
        // No healthy host at this moment (each one just marked down): waited for within the same
        // bound (the CI chaos run, seed 16: a MoveDisk FAILED NO_HOST on its closing read, the disk moved).
        last = err;
      }
      if (!h || i >= Math.max(1, this.hosts.healthy().length)) {
        if (Date.now() >= until) break;
        await sleep(500);
        tried.clear();
        i = -1;
        continue;
      }
      tried.add(h);
      try {
        return await fn(h);
      } catch (err) {
        if (!isHostUnreachable(err)) throw err;
        last = err;
      }
    }
    throw last;
  }

  /**
   * A replica that has just started knows no healthy host until its first poll: an operation it
   * resumes at once would read NO_HOST and fail after its data was written (found by the chaos run,
   * seed 101: a CreateDisk resumed after a scheduler kill FAILED, its disk left listed). Waits up to
   * 15 s, once; afterwards a read with no healthy host waits READ_RETRY_MS, then answers NO_HOST.
   */
  private async firstHealthyHost(): Promise<void> {
    for (const until = Date.now() + 15_000; !this.sawHealthyHost && Date.now() < until;) {
      if (this.hosts.healthy().length > 0) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    this.sawHealthyHost = true;
  }

  async domainInfo(entry: DomainEntry, bound?: CallBound): Promise<pb.StorageDomain> {
    let sd: pb.StorageDomain;
    try {
      sd = await this.read([], (h) => h.clients.metadata.getDomain({ path: entry.path }, bounded(bound, CALL_TIMEOUT_MS.getDomain)));
    } catch (err) {
      const e = SdmeshError.from(err);
      const status = e.code === GrpcStatus.NOT_FOUND ? pb.DomainStatus.DOMAIN_STATUS_INVALID : pb.DomainStatus.DOMAIN_STATUS_UNREACHABLE;
      sd = pb.StorageDomain.fromPartial({ id: entry.id, name: entry.name, path: entry.path, status, statusMessage: e.message });
    }
    if ((entry.maintenance || entry.removing) && sd.status === pb.DomainStatus.DOMAIN_STATUS_ACTIVE) {
      sd.status = pb.DomainStatus.DOMAIN_STATUS_MAINTENANCE;
      sd.statusMessage = entry.removing
        ? 'being removed: no operations, its hosts leave its lockspace'
        : 'deactivated: no operations, no host in its lockspace (ActivateStorageDomain brings it back)';
    }
    sd.hostsConnected = this.hosts
      .healthy()
      .filter((h) => h.lockspaces.get(entry.id) === pb.LockspaceState.LOCKSPACE_STATE_JOINED)
      .map((h) => h.spec.name)
      .sort();
    sd.criticalFreeBytes = entry.criticalFreeBytes;
    sd.warningFreePercent = entry.warningFreePercent;
    this.checkThresholds(entry, sd);
    return sd;
  }

  /** A domain's lifecycle event (attached, deactivated, activated, removed). */
  publishDomainEvent(kind: pb.DomainEvent_Kind, domain: pb.StorageDomain): void {
    this.events.publish({ $case: 'domain', domain: { kind, domain } });
  }

  /** A host's maintenance event. */
  publishHostEvent(kind: pb.HostEvent_Kind, host: string): void {
    this.events.publish({ $case: 'host', host: { kind, host } });
  }

  /** Publishes low-space events on state changes; returns the state. */
  checkThresholds(entry: DomainEntry, sd: pb.StorageDomain): 'ok' | 'warning' | 'critical' {
    if (sd.status !== pb.DomainStatus.DOMAIN_STATUS_ACTIVE || sd.capacityBytes <= 0) return 'ok';
    const state = sd.freeBytes < entry.criticalFreeBytes ? 'critical' : (sd.freeBytes / sd.capacityBytes) * 100 < entry.warningFreePercent ? 'warning' : 'ok';
    if (this.lowSpace.get(entry.id) !== state) {
      this.lowSpace.set(entry.id, state);
      if (state !== 'ok') {
        const kind = state === 'critical' ? pb.DomainEvent_Kind.KIND_LOW_SPACE_CRITICAL : pb.DomainEvent_Kind.KIND_LOW_SPACE_WARNING;
        this.events.publish({ $case: 'domain', domain: { kind, domain: sd } });
        this.log.warn({ domain: entry.id, freeBytes: sd.freeBytes, capacityBytes: sd.capacityBytes, state }, 'storage domain low on space');
      }
    }
    return state;
  }

  /** Refuses a new allocation on a domain below its critical free-space threshold. */
  async checkSpaceForAllocation(entry: DomainEntry, bytes: number, bound?: CallBound): Promise<void> {
    const sd = await this.domainInfo(entry, bound);
    if (sd.status !== pb.DomainStatus.DOMAIN_STATUS_ACTIVE) {
      throw failedPrecondition(`storage domain ${entry.id} is not active: ${sd.statusMessage}`, Reason.DOMAIN_NOT_ACTIVE);
    }
    if (this.checkThresholds(entry, sd) === 'critical') {
      throw resourceExhausted(
        `storage domain ${entry.id} has ${sd.freeBytes} bytes free, below its critical threshold of ${entry.criticalFreeBytes}: new allocations are refused`,
        Reason.INSUFFICIENT_SPACE,
      );
    }
    if (bytes > sd.freeBytes) {
      // Sparse volumes can still be created: only refuse what can never fit when fully written is not our call.
      this.log.debug({ domain: entry.id, bytes, free: sd.freeBytes }, 'allocation larger than free space (sparse)');
    }
  }

  /** An image's volumes, base first. NOT_FOUND DISK_NOT_FOUND when the image is absent. */
  async volumes(entry: DomainEntry, diskId: string, bound?: CallBound): Promise<pb.Volume[]> {
    try {
      const { volumes } = await this.read([], (h) =>
        h.clients.metadata.listVolumes({ domainPath: entry.path, imageId: diskId }, bounded(bound, CALL_TIMEOUT_MS.listVolumes)),
      );
      if (volumes.length === 0) throw notFound(`disk ${diskId} does not exist in storage domain ${entry.id}`, Reason.DISK_NOT_FOUND);
      return orderBaseFirst(volumes);
    } catch (err) {
      const e = SdmeshError.from(err);
      if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`disk ${diskId} does not exist in storage domain ${entry.id}`, Reason.DISK_NOT_FOUND);
      throw e;
    }
  }

  async disk(entry: DomainEntry, diskId: string, bound?: CallBound): Promise<pb.Disk> {
    return toDisk(entry.id, diskId, await this.volumes(entry, diskId, bound));
  }

  idsPath(entry: DomainEntry): string {
    return new DomainLayout(entry.path).idsPath;
  }
}

export function orderBaseFirst(volumes: pb.Volume[]): pb.Volume[] {
  const byParent = new Map(volumes.map((v) => [v.parentId, v]));
  const out: pb.Volume[] = [];
  // The base: no parent, or (a thin clone's) a parent in another image.
  let cur = volumes.find((v) => v.parentId === '' || v.parentImageId !== '');
  while (cur && out.length < volumes.length) {
    out.push(cur);
    cur = byParent.get(cur.id);
  }
  return out.length === volumes.length ? out : volumes;
}

export function toDisk(domainId: string, diskId: string, volumes: pb.Volume[]): pb.Disk {
  const base = volumes[0];
  const leaf = volumes[volumes.length - 1];
  return pb.Disk.fromPartial({
    name: `storageDomains/${domainId}/disks/${diskId}`,
    id: diskId,
    storageDomainId: domainId,
    description: base?.description ?? '',
    capacityBytes: leaf?.capacityBytes ?? 0,
    format: base?.format ?? pb.VolumeFormat.VOLUME_FORMAT_UNSPECIFIED,
    volumes,
    legality: volumes.every((v) => v.legality === pb.Legality.LEGALITY_LEGAL) ? pb.Legality.LEGALITY_LEGAL : pb.Legality.LEGALITY_ILLEGAL,
    template: volumes.some((v) => v.template),
    templateDiskId: base?.parentImageId ?? '',
  });
}

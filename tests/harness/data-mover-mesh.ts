import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, pb, subscribeEvents, type ServiceClient, localLeaseManagerClient } from '@sdmesh/common';
import { LocalMesh, type LocalMeshOptions } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from './paths';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export interface DataMoverTestHost {
  hostId: number;
  name: string;
  metadata: ServiceClient<typeof pb.MetadataTxServiceDefinition>;
  mover: ServiceClient<typeof pb.DataMoverServiceDefinition>;
  leases: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
}

/**
 * LocalMesh with N hosts, each a real sanlock daemon, lease-manager, metadata-tx and
 * data-mover (no gc, no scheduler), io_timeout 1 s, plus an event recorder and clients.
 */
export class DataMoverMesh {
  readonly dir = makeTestDir('data-mover');
  readonly mesh: LocalMesh;
  readonly hosts: DataMoverTestHost[] = [];
  readonly events: pb.Event[] = [];
  private watcher?: NatsConnection;

  constructor(
    hosts: number,
    env: NodeJS.ProcessEnv = {},
    /** Without the data-mover for tests of lease holders of their own (its client is then unusable). */
    services: Array<'lease-manager' | 'metadata-tx' | 'data-mover'> = ['lease-manager', 'metadata-tx', 'data-mover'],
    /** More of LocalMesh's options, e.g. `restart` to have a killed service started again. */
    meshOptions: Pick<LocalMeshOptions, 'restart' | 'onSupervisorEvent'> = {},
  ) {
    this.mesh = new LocalMesh({
      dir: this.dir,
      hosts,
      scheduler: false,
      perHostServices: services,
      env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', ...env },
      logLevel: 'debug',
      ...meshOptions,
    });
  }

  async start(): Promise<this> {
    await this.mesh.start();
    this.watcher = await connect(this.mesh.nats.connectOptions('sdmctl'));
    subscribeEvents(this.watcher, (event) => this.events.push(event));
    const asScheduler = this.mesh.credentials({ kind: 'scheduler' });
    for (const h of this.mesh.hosts) {
      this.hosts.push({
        hostId: h.hostId,
        name: h.name,
        metadata: createClient(pb.MetadataTxServiceDefinition, h.services['metadata-tx']!.grpcAddress, asScheduler),
        mover: createClient(pb.DataMoverServiceDefinition, h.services['data-mover']?.grpcAddress ?? 'unix:/nonexistent', asScheduler),
        // This test process as a process of the host: the lease API is host-local.
        leases: localLeaseManagerClient(`unix:${this.mesh.leaseSocket(h.name)}`),
      });
    }
    return this;
  }

  host(id: number): DataMoverTestHost {
    return this.hosts[id - 1]!;
  }

  service(id: number, name: 'data-mover' | 'metadata-tx' | 'lease-manager') {
    return this.mesh.hosts[id - 1]!.services[name]!;
  }

  /** Formats a domain (io_timeout 1 s) under the shared storage; returns its id and path. */
  async formatDomain(name: string): Promise<{ id: string; path: string }> {
    const id = randomUUID();
    const p = path.join(this.mesh.storageDir, name);
    await this.host(1).metadata.formatDomain({ domainId: id, name, path: p, ioTimeoutSeconds: 1 }, { timeoutMs: 60000 });
    return { id, path: p };
  }

  async createVolume(
    domain: { path: string },
    opts: { format: 'RAW' | 'QCOW2'; capacity: number; illegal?: boolean; preallocated?: boolean },
  ): Promise<pb.Volume & { ref: pb.VolumeRef }> {
    const imageId = randomUUID();
    const volumeId = randomUUID();
    const v = await this.host(1).metadata.createVolume(
      {
        domainPath: domain.path,
        imageId,
        volumeId,
        format: opts.format === 'RAW' ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
        allocation: opts.preallocated ? pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED : pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
        capacityBytes: opts.capacity,
        initiallyIllegal: opts.illegal ?? false,
        operationId: `test-create-${volumeId}`,
      },
      { timeoutMs: 60000 },
    );
    return { ...v, ref: { domainPath: domain.path, imageId, volumeId } };
  }

  /** A qcow2 snapshot of `parent` (same image), optionally ILLEGAL. */
  async createSnapshot(parent: pb.VolumeRef, illegal = false): Promise<pb.Volume & { ref: pb.VolumeRef }> {
    const volumeId = randomUUID();
    const v = await this.host(1).metadata.createVolume(
      {
        domainPath: parent.domainPath,
        imageId: parent.imageId,
        volumeId,
        parentId: parent.volumeId,
        format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
        allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
        initiallyIllegal: illegal,
        operationId: `test-snapshot-${volumeId}`,
      },
      { timeoutMs: 60000 },
    );
    return { ...v, ref: { domainPath: parent.domainPath, imageId: parent.imageId, volumeId } };
  }

  async getVolume(ref: pb.VolumeRef): Promise<pb.Volume> {
    const r = await this.host(1).metadata.getVolume({ domainPath: ref.domainPath, imageId: ref.imageId, volumeId: ref.volumeId });
    return r.volume!;
  }

  /** Follows WatchJob until the job ends; returns every state seen (last = final). */
  async watchJob(hostId: number, jobId: string, onState?: (job: pb.Job) => void): Promise<pb.Job[]> {
    const seen: pb.Job[] = [];
    for await (const job of this.host(hostId).mover.watchJob({ jobId }, { timeoutMs: 170_000 })) {
      seen.push(job);
      onState?.(job);
    }
    return seen;
  }

  jobEvents(jobId: string): pb.JobEvent[] {
    return this.events.flatMap((e) => (e.payload?.$case === 'job' && e.payload.job.jobId === jobId ? [e.payload.job] : []));
  }

  async metrics(hostId: number): Promise<string> {
    const res = await fetch(`http://127.0.0.1:${this.service(hostId, 'data-mover').metricsPort}/metrics`);
    return res.text();
  }

  async stop(): Promise<void> {
    for (const h of this.hosts) {
      h.metadata.close();
      h.mover.close();
      h.leases.close();
    }
    await this.watcher?.close().catch(() => undefined);
    await this.mesh.stop();
    removeTestDir(this.dir);
  }
}

/** Writes `count` MiB of random bytes at `offsetMiB` into a file (in place, like a guest would). */
export function writeRandom(file: string, offsetMiB: number, count: number): void {
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `count=${count}`, `seek=${offsetMiB}`, 'conv=notrunc', 'status=none']);
}

/** Bytes a file really occupies on disk. */
export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

/** Paths of a process's open file descriptors (qemu-img gets volumes as /dev/fd/N, so its cmdline names none). */
function openFiles(pid: number): string[] {
  try {
    return fs.readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
      try {
        return [fs.readlinkSync(`/proc/${pid}/fd/${fd}`)];
      } catch {
        return [];
      }
    });
  } catch {
    return [];
  }
}

/** Linux's O_DIRECT as /proc/<pid>/fdinfo shows it (octal flags). */
export const O_DIRECT = 0o40000;

/** The open flags of each descriptor process `pid` holds on `file` (from /proc/<pid>/fdinfo). */
export function descriptorFlags(pid: number, file: string): number[] {
  return fs.readdirSync(`/proc/${pid}/fd`).flatMap((fd) => {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`) !== file) return [];
      const m = /^flags:\s+([0-7]+)$/m.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
      return m ? [parseInt(m[1]!, 8)] : [];
    } catch {
      return [];
    }
  });
}

/** Live processes whose command line names `needle` (e.g. a volume id) or that hold a file open whose path contains it: children left behind. */
export function processesMentioning(needle: string): Array<{ pid: number; cmdline: string }> {
  const out: Array<{ pid: number; cmdline: string }> = [];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0').join(' ');
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      if (state !== 'Z' && (cmdline.includes(needle) || openFiles(Number(name)).some((f) => f.includes(needle)))) out.push({ pid: Number(name), cmdline });
    } catch {
      // gone
    }
  }
  return out;
}

export const volumeFile = (ref: pb.VolumeRef) => path.join(ref.domainPath, 'images', ref.imageId, ref.volumeId);
export const recordFile = (ref: pb.VolumeRef) => volumeFile(ref) + '.meta';

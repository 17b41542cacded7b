import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { monotonicMicros, pb, SdmeshError } from '@sdmesh/common';
import type { History } from './history';
import { MiB, type PublicApi } from './mesh';
import { Rng } from './rng';

const run = promisify(execFile);

/** Import files the clients wrote, by path and sha256 (ImportDisk must leave them as they are). */
export const importHashes = new Map<string, string>();

/** One byte pattern written at an offset: the guest-visible content of a disk is its list of these over zeros. */
export interface PatternWrite {
  offset: number;
  length: number;
  pattern: number;
  /**
   * A guest write that failed with ENOSPC (its domain full): each byte of its range is either
   * what it was or the pattern, as a real disk's failed write leaves it.
   */
  uncertain?: boolean;
}

/** What the history says a disk is: where it lives and what a guest must read from it. */
export interface DiskModel {
  id: string;
  domainId: string;
  capacity: number;
  writes: PatternWrite[];
  template: boolean;
  /** A thin clone's template: never deleted while this disk exists. */
  templateOf?: string;
  /** Volumes in its chain as last seen (for DeleteSnapshot). */
  chain: number;
}

/** What every client shares: the domains, the API replicas, the history, the disks. */
export interface WorkloadContext {
  apis: PublicApi[];
  history: History;
  domains: pb.StorageDomain[];
  hosts: string[];
  importDir: string;
  workDir: string;
  disks: Map<string, DiskModel>;
  /** Longest a call is retried, and an operation waited for (ms). */
  opTimeoutMs: number;
}

const TERMINAL = [pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED];
/** Codes a client retries with the same request id: the call may not have reached a live replica. */
const TRANSIENT = [1, 2, 4, 13, 14];
const statusName = (s: pb.OperationStatus) => pb.operationStatusToJSON(s).replace('OPERATION_STATUS_', '');

/**
 * Do these guest-visible bytes match the disk's history: the patterns written over zeros, a byte
 * of a failed (uncertain) write's range either its earlier value or that write's pattern?
 */
export function matchesHistory(got: Buffer, d: DiskModel): boolean {
  if (got.length !== d.capacity) return false;
  const expected = Buffer.alloc(d.capacity);
  for (const w of d.writes) if (!w.uncertain) expected.fill(w.pattern, w.offset, w.offset + w.length);
  if (got.equals(expected)) return true;
  if (!d.writes.some((w) => w.uncertain)) return false;
  // Byte by byte: the value each certain write left, or the pattern of a later uncertain one.
  const alternative = Buffer.alloc(d.capacity);
  const hasAlternative = Buffer.alloc(d.capacity);
  expected.fill(0);
  for (const w of d.writes) {
    if (w.uncertain) {
      alternative.fill(w.pattern, w.offset, w.offset + w.length);
      hasAlternative.fill(1, w.offset, w.offset + w.length);
    } else {
      expected.fill(w.pattern, w.offset, w.offset + w.length);
      hasAlternative.fill(0, w.offset, w.offset + w.length);
    }
  }
  for (let i = 0; i < got.length; i++) if (got[i] !== expected[i] && !(hasAlternative[i] && got[i] === alternative[i])) return false;
  return true;
}

/** The guest-visible bytes of a disk's leaf (through its chain), read with qemu-img as a reader that shares the image. */
export async function readDisk(disk: pb.Disk, scratch: string): Promise<Buffer> {
  const leaf = disk.volumes[disk.volumes.length - 1]!;
  const format = leaf.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? 'qcow2' : 'raw';
  const out = path.join(scratch, `read-${disk.id}-${process.pid}-${monotonicMicros()}.raw`);
  try {
    await run('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', leaf.path, out], { timeout: 120_000 });
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

type OpKind = 'create' | 'write' | 'snapshot' | 'copy' | 'move' | 'delete' | 'import' | 'extend' | 'delete-snapshot' | 'template-clone';

/**
 * One client of the public API: a loop of random operations on its own disks (so its model of
 * them needs no coordination with the other clients), each call retried with its request id on
 * either replica until a live one answers, each operation followed to its end.
 */
export class Client {
  private readonly rng: Rng;
  private seq = 0;
  private readonly mine: string[] = [];
  readonly outcomes: Record<string, number> = {};

  constructor(
    readonly index: number,
    seed: number,
    private readonly ctx: WorkloadContext,
  ) {
    this.rng = new Rng(seed * 1000 + index + 1);
  }

  async loop(stop: AbortSignal): Promise<void> {
    while (!stop.aborted) {
      const kind = this.choose();
      try {
        await this.step(kind);
      } catch (err) {
        this.count(kind, 'client-error');
        this.ctx.history.add({ kind: 'outcome', client: this.index, op: kind, requestId: '', outcome: 'client-error', error: String(err).slice(0, 500) });
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  private count(kind: string, outcome: string): void {
    const key = `${kind} ${outcome}`;
    this.outcomes[key] = (this.outcomes[key] ?? 0) + 1;
  }

  private models(filter: (d: DiskModel) => boolean = () => true): DiskModel[] {
    return this.mine.map((id) => this.ctx.disks.get(id)!).filter(filter);
  }

  private choose(): OpKind {
    const plain = this.models((d) => !d.template);
    if (plain.length === 0) return 'create';
    const weights: Partial<Record<OpKind, number>> = { write: 25, snapshot: 10, copy: 8, move: 8, extend: 5, import: 4 };
    if (this.mine.length < 5) weights.create = 12;
    if (plain.length > 1) weights.delete = 8;
    if (plain.some((d) => d.chain > 1)) weights['delete-snapshot'] = 8;
    if (this.models((d) => d.template).length < 2) weights['template-clone'] = 3;
    return this.rng.weighted(weights);
  }

  /** A domain other than `id` (the random draw only with a choice: two-domain runs keep their sequence). */
  private otherDomain(id: string): string {
    const others = this.ctx.domains.filter((d) => d.id !== id);
    return (others.length > 1 ? this.rng.pick(others) : others[0]!).id;
  }

  /** Retries a call with the same request id on alternating replicas while nothing live answered. */
  private async submit(op: string, requestId: string, args: Record<string, unknown>, call: (api: PublicApi) => Promise<pb.Operation>) {
    this.ctx.history.add({ kind: 'call', client: this.index, op, requestId, args });
    const until = Date.now() + this.ctx.opTimeoutMs;
    for (let attempt = 0; ; attempt++) {
      const api = this.ctx.apis[(this.index + attempt) % this.ctx.apis.length]!;
      try {
        return { op: await call(api) };
      } catch (err) {
        const e = SdmeshError.fromGrpc(err);
        if (!TRANSIENT.includes(e.code) || Date.now() > until) {
          const outcome = TRANSIENT.includes(e.code) ? 'unanswered' : `refused ${e.reason || e.code}`;
          this.count(op, outcome);
          this.ctx.history.add({ kind: 'outcome', client: this.index, op, requestId, outcome, error: e.message.slice(0, 300) });
          return { refused: outcome };
        }
        await new Promise((r) => setTimeout(r, 300 + attempt * 100));
      }
    }
  }

  /** Follows an operation to its end on whichever replica answers. */
  private async follow(op: string, requestId: string, name: string): Promise<pb.Operation | undefined> {
    const until = Date.now() + this.ctx.opTimeoutMs;
    for (let attempt = 0; Date.now() < until; attempt++) {
      const api = this.ctx.apis[(this.index + attempt) % this.ctx.apis.length]!;
      const cur = await api.ops.waitOperation({ name, timeoutSeconds: 5 }, { timeoutMs: 10_000 }).catch(() => undefined);
      if (cur && TERMINAL.includes(cur.status)) {
        const outcome = statusName(cur.status);
        // A FAILED operation by its reason (INSUFFICIENT_SPACE on a full domain, ...).
        this.count(op, cur.error?.reason && cur.status === pb.OperationStatus.OPERATION_STATUS_FAILED ? `${outcome} ${cur.error.reason}` : outcome);
        this.ctx.history.add({
          kind: 'outcome',
          client: this.index,
          op,
          requestId,
          outcome,
          operationName: name,
          error: cur.error ? `${cur.error.reason}: ${cur.error.message}`.slice(0, 300) : undefined,
          // The disk an operation made or changed: the excerpt of a violation about it finds this line.
          result: cur.result?.$case === 'disk' ? { disk: cur.result.disk.id, domain: cur.result.disk.storageDomainId } : undefined,
        });
        return cur;
      }
      if (!cur) await new Promise((r) => setTimeout(r, 500));
    }
    this.count(op, 'unfinished');
    this.ctx.history.add({ kind: 'outcome', client: this.index, op, requestId, outcome: 'unfinished', operationName: name });
    return undefined;
  }

  /** Submits and follows; the finished operation when it is DONE. */
  private async operation(op: string, args: Record<string, unknown>, call: (api: PublicApi, requestId: string) => Promise<pb.Operation>) {
    const requestId = `c${this.index}-${++this.seq}-${op}`;
    const submitted = await this.submit(op, requestId, args, (api) => call(api, requestId));
    if (!submitted.op) return undefined;
    const final = await this.follow(op, requestId, submitted.op.name);
    return final?.status === pb.OperationStatus.OPERATION_STATUS_DONE ? final : undefined;
  }

  private async getDisk(d: DiskModel): Promise<pb.Disk | undefined> {
    for (let attempt = 0; attempt < 20; attempt++) {
      const api = this.ctx.apis[(this.index + attempt) % this.ctx.apis.length]!;
      try {
        return await api.disks.getDisk({ storageDomainId: d.domainId, diskId: d.id }, { timeoutMs: 10_000 });
      } catch (err) {
        if (!TRANSIENT.includes(SdmeshError.fromGrpc(err).code)) return undefined;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    return undefined;
  }

  private adopt(disk: pb.Disk, writes: PatternWrite[], extra: Partial<DiskModel> = {}): void {
    this.ctx.disks.set(disk.id, {
      id: disk.id,
      domainId: disk.storageDomainId,
      capacity: disk.capacityBytes,
      writes,
      template: false,
      chain: disk.volumes.length,
      ...extra,
    });
    this.mine.push(disk.id);
  }

  private forget(id: string): void {
    this.ctx.disks.delete(id);
    this.mine.splice(this.mine.indexOf(id), 1);
  }

  private async step(kind: OpKind): Promise<void> {
    const plain = this.models((d) => !d.template);
    const d = plain.length ? this.rng.pick(plain) : undefined;
    switch (kind) {
      case 'create': {
        const domain = this.rng.pick(this.ctx.domains).id;
        const format = this.rng.next() < 0.5 ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2;
        const capacity = 8 * MiB;
        const done = await this.operation('create', { domain, format, capacity }, (api, requestId) =>
          api.disks.createDisk({ requestId, storageDomainId: domain, capacityBytes: capacity, format }),
        );
        if (done?.result?.$case === 'disk') this.adopt(done.result.disk, []);
        return;
      }
      case 'write':
        return this.write(d!);
      case 'snapshot': {
        const done = await this.operation('snapshot', { disk: d!.id }, (api, requestId) =>
          api.disks.snapshotDisk({ requestId, storageDomainId: d!.domainId, diskId: d!.id }),
        );
        if (done) d!.chain++;
        return;
      }
      case 'copy': {
        const target = this.otherDomain(d!.domainId);
        // A thin clone is copied flattened (its chain goes into the template's disk otherwise).
        const collapse = !!d!.templateOf;
        const done = await this.operation('copy', { disk: d!.id, target, collapse }, (api, requestId) =>
          api.disks.copyDisk({ requestId, storageDomainId: d!.domainId, diskId: d!.id, targetStorageDomainId: target, collapse }),
        );
        if (done?.result?.$case === 'disk') this.adopt(done.result.disk, [...d!.writes]);
        return;
      }
      case 'move': {
        // A thin clone stays beside its template: it is copied (flattened) instead.
        if (d!.templateOf) return this.step('copy');
        const target = this.otherDomain(d!.domainId);
        const done = await this.operation('move', { disk: d!.id, target }, (api, requestId) =>
          api.disks.moveDisk({ requestId, storageDomainId: d!.domainId, diskId: d!.id, targetStorageDomainId: target }),
        );
        if (done) d!.domainId = target;
        return;
      }
      case 'delete': {
        // Its content once more before it goes: damage to a disk that is deleted later is still seen.
        await this.verify(d!);
        const done = await this.operation('delete', { disk: d!.id }, (api, requestId) =>
          api.disks.deleteDisk({ requestId, storageDomainId: d!.domainId, diskId: d!.id }),
        );
        if (done) this.forget(d!.id);
        return;
      }
      case 'extend': {
        const capacity = d!.capacity + 4 * MiB;
        if (capacity > 32 * MiB) return this.write(d!);
        const done = await this.operation('extend', { disk: d!.id, capacity }, (api, requestId) =>
          api.disks.extendDisk({ requestId, storageDomainId: d!.domainId, diskId: d!.id, capacityBytes: capacity }),
        );
        if (done) d!.capacity = capacity;
        return;
      }
      case 'delete-snapshot': {
        const disk = d!.chain > 1 ? await this.getDisk(d!) : undefined;
        if (!disk || disk.volumes.length < 2) return;
        const volume = this.rng.pick(disk.volumes.slice(0, -1)).id;
        const done = await this.operation('delete-snapshot', { disk: d!.id, volume }, (api, requestId) =>
          api.disks.deleteSnapshot({ requestId, storageDomainId: d!.domainId, diskId: d!.id, volumeId: volume }),
        );
        if (done) d!.chain = disk.volumes.length - 1;
        return;
      }
      case 'import': {
        const file = path.join(this.ctx.importDir, `import-c${this.index}-${this.seq + 1}.raw`);
        const write: PatternWrite = { offset: this.rng.int(0, 7) * MiB, length: MiB, pattern: this.rng.int(1, 255) };
        const buf = Buffer.alloc(8 * MiB);
        buf.fill(write.pattern, write.offset, write.offset + write.length);
        fs.writeFileSync(file, buf);
        importHashes.set(file, crypto.createHash('sha256').update(buf).digest('hex'));
        const domain = this.rng.pick(this.ctx.domains).id;
        const host = this.rng.pick(this.ctx.hosts);
        const done = await this.operation('import', { domain, host, file }, (api, requestId) =>
          api.disks.importDisk({ requestId, storageDomainId: domain, host, sourcePath: file, format: pb.VolumeFormat.VOLUME_FORMAT_RAW }),
        );
        if (done?.result?.$case === 'disk') this.adopt(done.result.disk, [write]);
        return;
      }
      case 'template-clone': {
        const template = this.models((m) => m.template)[0] ?? d!;
        if (!template.template) {
          const marked = await this.operation('mark-template', { disk: template.id }, (api, requestId) =>
            api.disks.markDiskTemplate({ requestId, storageDomainId: template.domainId, diskId: template.id }),
          );
          if (!marked) return;
          template.template = true;
        }
        const thin = this.rng.next() < 0.5;
        const target = thin ? template.domainId : this.rng.pick(this.ctx.domains).id;
        const done = await this.operation('clone', { template: template.id, thin, target }, (api, requestId) =>
          api.disks.cloneDisk({
            requestId,
            storageDomainId: template.domainId,
            templateDiskId: template.id,
            mode: thin ? pb.CloneMode.CLONE_MODE_THIN : pb.CloneMode.CLONE_MODE_FULL,
            targetStorageDomainId: target,
          }),
        );
        if (done?.result?.$case === 'disk') this.adopt(done.result.disk, [...template.writes], thin ? { templateOf: template.id } : {});
        return;
      }
    }
  }

  /** A guest write: a pattern into the disk's leaf with qemu-io, while no operation of ours runs on it. */
  private async write(d: DiskModel): Promise<void> {
    const disk = await this.getDisk(d);
    if (!disk) return;
    const leaf = disk.volumes[disk.volumes.length - 1]!;
    if (disk.legality !== pb.Legality.LEGALITY_LEGAL) {
      this.count('write', 'skipped: disk not LEGAL');
      this.ctx.history.add({
        kind: 'content-check',
        client: this.index,
        disk: d.id,
        ok: false,
        detail: `before a write: disk is ${pb.legalityToJSON(disk.legality)}`,
      });
      return;
    }
    const length = this.rng.int(1, 16) * 64 * 1024;
    const offset = this.rng.int(0, (d.capacity - length) / (64 * 1024)) * 64 * 1024;
    const pattern = this.rng.int(1, 255);
    const format = leaf.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? 'qcow2' : 'raw';
    const start = monotonicMicros();
    let pid = -1;
    let ok = true;
    let noSpace = false;
    try {
      const child = execFile('qemu-io', ['-f', format, '-c', `write -P ${pattern} ${offset} ${length}`, leaf.path], { timeout: 60_000 });
      pid = child.pid ?? -1;
      let output = '';
      child.stdout?.on('data', (b: Buffer) => (output += b.toString()));
      child.stderr?.on('data', (b: Buffer) => (output += b.toString()));
      await new Promise<void>((resolve, reject) =>
        child.once('exit', (code) =>
          code === 0 && !/write failed/.test(output) ? resolve() : reject(new Error(`qemu-io exited ${code}: ${output.trim().slice(0, 200)}`)),
        ),
      );
    } catch (err) {
      ok = false;
      // A full domain (the fill-domain fault): the guest's write fails as it would on a VM; not a finding.
      noSpace = /No space left on device/.test(String(err));
      if (!noSpace) this.ctx.history.add({ kind: 'content-check', client: this.index, disk: d.id, ok: false, detail: `guest write failed: ${String(err)}` });
    }
    this.ctx.history.add({
      kind: 'guest-write',
      client: this.index,
      disk: d.id,
      domain: d.domainId,
      volume: leaf.id,
      leaseOffset: leaf.lease?.offset,
      pattern,
      offset,
      length,
      pid,
      start,
      end: monotonicMicros(),
      ok,
    });
    this.count('write', ok ? 'DONE' : noSpace ? 'failed ENOSPC' : 'failed');
    if (ok || noSpace) d.writes.push({ offset, length, pattern, ...(noSpace ? { uncertain: true } : {}) });
  }

  /** Compares a disk's content with the history's; recorded, judged by the checker. */
  async verify(d: DiskModel): Promise<boolean> {
    const disk = await this.getDisk(d);
    if (!disk) {
      this.ctx.history.add({ kind: 'content-check', client: this.index, disk: d.id, ok: false, detail: 'not found' });
      return false;
    }
    const got = await readDisk(disk, this.ctx.workDir);
    const ok = matchesHistory(got, d);
    this.ctx.history.add({
      kind: 'content-check',
      client: this.index,
      disk: d.id,
      ok,
      detail: ok ? undefined : `content differs (${got.length} bytes read, ${d.capacity} expected)`,
    });
    return ok;
  }
}

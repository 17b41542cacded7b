/**
 * Operation fences: a rollback's guard against a create of its operation that commits late.
 *
 * A cancelled or failed operation's rollback looks on storage for what the operation created and
 * deletes it. A CreateVolume of that operation still on its way to a metadata-tx (or queued there,
 * or past its last cancel check) could commit after that look found nothing, leaving a volume no
 * operation owns. So the rollback first fences the operation (FenceOperation): under the domain
 * metadata lease it writes `dom_md/fence_<operationId>_<epoch ms>`, made durable before it answers.
 * A create that carries an operation id checks, under the lease, that its operation has no fence,
 * and otherwise fails ABORTED OPERATION_FENCED having written nothing. The lease orders the two:
 * a create that committed before the fence is found by the rollback's look (which runs after the
 * fence), one that had not is refused.
 *
 * The check costs no storage read per create: the fences are read (one listing of dom_md, names
 * only) once per lease hold and kept for the next hold of this process when the lease's version
 * proves that nobody else held it in between (lver = the last + 1; sanlock bumps it on every
 * exclusive acquire by anyone) — only a holder of the lease writes a fence. A fence written by
 * this process is added to what it knows. Within one hold the create's check (in its serial part)
 * is as good as one just before its commit: a FenceOperation has no overlap keys, so it starts only
 * after every create of the hold in flight has ended (group-commit.ts).
 *
 * On storage a fence is its name: an entry called `fence_<uuid>_<ms>` fences that operation whatever
 * it holds (fail-safe: a torn or foreign file still refuses the late create). The file holds a
 * record (RECORD=sdmesh-fence, checked when a fence is written again; a torn one is rewritten).
 * Names are parsed strictly; other names in dom_md are not fences. Fences are bounded: a fence
 * expires after the retention (default a day, far beyond any create request's life: the scheduler
 * sends creates only while the operation runs, each with a deadline) and is removed, under the
 * lease, by the GC's next pass over the domain and by the next FenceOperation of the domain (name
 * parser and expiry rule shared: packages/common/src/storage/fences.ts; FenceOperation's removal keeps
 * the bound true where no GC runs, at no cost: it lists dom_md anyway); at most MAX_FENCES live ones are kept (the next
 * fence is then refused RESOURCE_EXHAUSTED TOO_MANY_FENCES: the rollback retries), and a listing
 * with more than MAX_LISTED_FENCES fence names (only a hostile writer makes one) is refused.
 */
import path from 'node:path';
import {
  aborted,
  type ConfinedRoot,
  corruptRecord,
  decodeRecord,
  DomainLayout,
  DomainLeases,
  encodeRecord,
  type FenceName,
  FORMAT_VERSION,
  fenceFileName,
  isFenceExpired,
  isUuid,
  parseFenceName,
  Reason,
  resourceExhausted,
  SdmeshError,
} from '@sdmesh/common';

export const FENCE_RECORD_KIND = 'sdmesh-fence';
/** Live fences a domain keeps at most; the next FenceOperation is refused. */
export const MAX_FENCES = 4096;
/** A listing with more fence names than this is not trusted (creates with an operation id are refused). */
export const MAX_LISTED_FENCES = 4 * MAX_FENCES;

/** Temp file of a fence rewritten after a torn write (writeFileAtomic's `.tx-<txid>`). */
const FENCE_TEMP = /^fence_[0-9a-f-]{36}_\d{1,15}\.tx-[A-Za-z0-9-]{1,64}$/;

export interface FenceRecord {
  domainId: string;
  operationId: string;
  fencedMs: number;
  /** sanlock host id of the metadata-tx that wrote it (0 = unknown). */
  hostId: number;
}

export function encodeFenceRecord(r: FenceRecord): Buffer {
  return encodeRecord(FENCE_RECORD_KIND, [
    ['FORMAT_VERSION', FORMAT_VERSION],
    ['DOMAIN_ID', r.domainId],
    ['OPERATION_ID', r.operationId],
    ['CTIME_MS', r.fencedMs],
    ['HOST_ID', r.hostId],
  ]);
}

/** Parses a fence record strictly (exactly its keys); DATA_LOSS errors like every record. */
export function decodeFenceRecord(data: Buffer, where: string): FenceRecord {
  const fields = decodeRecord(FENCE_RECORD_KIND, data, where);
  const bad = (what: string) => corruptRecord(`${where}: ${what}`, 'CORRUPT_RECORD');
  const keys = [...fields.keys()].sort().join(',');
  if (keys !== 'CTIME_MS,DOMAIN_ID,FORMAT_VERSION,HOST_ID,OPERATION_ID') throw bad(`unexpected keys ${keys}`);
  if (fields.get('FORMAT_VERSION') !== String(FORMAT_VERSION)) throw bad(`FORMAT_VERSION=${fields.get('FORMAT_VERSION')}`);
  const domainId = fields.get('DOMAIN_ID')!;
  const operationId = fields.get('OPERATION_ID')!;
  if (!isUuid(domainId) || !isUuid(operationId)) throw bad('DOMAIN_ID and OPERATION_ID must be lowercase UUIDs');
  const int = (key: string, max: number) => {
    const v = fields.get(key)!;
    const n = Number(v);
    if (!/^\d{1,15}$/.test(v) || n > max) throw bad(`${key}=${v} is not a whole number in 0..${max}`);
    return n;
  };
  return { domainId, operationId, fencedMs: int('CTIME_MS', Number.MAX_SAFE_INTEGER), hostId: int('HOST_ID', 2000) };
}

/** The fences of a domain as one listing of dom_md shows them (any entry type: the name is the fence). */
export async function listFences(dom: ConfinedRoot, root: string): Promise<{ fences: FenceName[]; temps: string[] }> {
  const listing = await dom.list(new DomainLayout(root).domMdDir, ['file']);
  const fences: FenceName[] = [];
  const temps: string[] = [];
  for (const { name } of [...listing.entries, ...listing.skipped]) {
    const fence = parseFenceName(name);
    if (fence) fences.push(fence);
    else if (FENCE_TEMP.test(name)) temps.push(name);
  }
  if (fences.length > MAX_LISTED_FENCES) {
    throw resourceExhausted(
      `${root}/dom_md holds ${fences.length} operation fences, more than sdmesh ever keeps (${MAX_FENCES}): creates that carry an operation id are refused until an operator removes them`,
      Reason.TOO_MANY_FENCES,
    );
  }
  return { fences, temps };
}

export const fencedError = (operationId: string, domainId: string): SdmeshError =>
  aborted(`operation ${operationId} was aborted and its rollback fenced it in domain ${domainId}: this create of it commits nothing`, Reason.OPERATION_FENCED);

/** What one metadata-tx process knows of a domain's fences, and in which of its holds that was true. */
interface Known {
  root: string;
  /** The hold (GroupHold.serial) in which it was last known true. */
  serial: number;
  lver: number;
  ids: Set<string>;
}

/** The lease hold a lookup runs in (GroupHold's fields). */
export interface HoldRef {
  serial: number;
  lease: { lver?: number };
}

/**
 * The fenced operations of each domain, as known to this process: read once per hold, or kept
 * from this process's previous hold when the lease's version shows nobody else held it since.
 */
export class OperationFences {
  private readonly known = new Map<string, Known>();

  /** Counts listings of dom_md (tests: a create must not read storage when nothing changed). */
  reads = 0;

  /** Whether the operation is fenced in the domain. Call under the domain lease, in hold `hold`. */
  async isFenced(domain: { id: string; root: string; dom: ConfinedRoot }, hold: HoldRef, operationId: string): Promise<boolean> {
    return (await this.current(domain, hold)).ids.has(operationId);
  }

  /** A fence this process wrote in hold `hold` (what it knows stays true only if it knew the hold's state). */
  added(domainId: string, hold: HoldRef, operationId: string): void {
    const k = this.known.get(domainId);
    if (k && k.serial === hold.serial) k.ids.add(operationId);
    else this.known.delete(domainId);
  }

  /** What a failed fence write left is unknown: read again next time. */
  forget(domainId: string): void {
    this.known.delete(domainId);
  }

  private async current(domain: { id: string; root: string; dom: ConfinedRoot }, hold: HoldRef): Promise<Known> {
    const lver = hold.lease.lver ?? 0;
    const k = this.known.get(domain.id);
    if (k && k.root === domain.root) {
      if (k.serial === hold.serial) return k;
      // True at the end of this process's previous hold, and nobody has held the lease since.
      if (k.serial === hold.serial - 1 && DomainLeases.heldAloneSince(k.lver, lver)) {
        k.serial = hold.serial;
        k.lver = lver;
        return k;
      }
    }
    this.known.delete(domain.id);
    this.reads++;
    const { fences } = await listFences(domain.dom, domain.root);
    const fresh: Known = { root: domain.root, serial: hold.serial, lver, ids: new Set(fences.map((f) => f.operationId)) };
    this.known.set(domain.id, fresh);
    return fresh;
  }
}

/**
 * Writes the operation's fence (under the domain lease): durable before it returns. Idempotent:
 * an existing fence of the operation stands (a torn one is rewritten whole). Expired fences and
 * temp files of an interrupted rewrite are removed first.
 */
export async function writeFence(
  dom: ConfinedRoot,
  root: string,
  record: FenceRecord,
  opts: { retentionMs: number; txid: string },
): Promise<'written' | 'existed'> {
  const domMd = new DomainLayout(root).domMdDir;
  const { fences, temps } = await listFences(dom, root);
  const mine = fences.find((f) => f.operationId === record.operationId);
  if (mine) {
    const file = path.join(domMd, mine.name);
    const intact = await dom
      .readSmallFile(file, 4096)
      .then((data) => decodeFenceRecord(data, `${dom.relative(file)} in ${root}`).operationId === record.operationId)
      .catch(() => false);
    if (!intact) await dom.writeFileAtomic(file, encodeFenceRecord({ ...record, fencedMs: mine.fencedMs }), { tempSuffix: `.tx-${opts.txid}` });
    else await dom.fsyncDir(domMd);
    return 'existed';
  }
  // Removing is tidiness: an entry that will not go (not a file: hostile) just stays counted.
  const removed = (name: string) =>
    dom.unlink(path.join(domMd, name)).then(
      () => true,
      () => false,
    );
  let live = 0;
  for (const f of fences) if (!(isFenceExpired(f.fencedMs, record.fencedMs, opts.retentionMs) && (await removed(f.name)))) live++;
  for (const t of temps) await removed(t);
  if (live >= MAX_FENCES) {
    throw resourceExhausted(
      `domain ${record.domainId} holds ${live} operation fences (at most ${MAX_FENCES}); older ones expire after the retention`,
      Reason.TOO_MANY_FENCES,
    );
  }
  const file = path.join(domMd, fenceFileName(record.operationId, record.fencedMs));
  // Created exclusively under its final name: a crash mid-write leaves a torn fence, which still
  // fences (its name) and is rewritten by the retry.
  const handle = await dom.createFile(file, 'record');
  try {
    await handle.writeFile(encodeFenceRecord(record));
    await handle.sync();
  } finally {
    await handle.close();
  }
  await dom.fsyncDir(domMd);
  return 'written';
}

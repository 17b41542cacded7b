import path from 'node:path';
import {
  ConfinedRoot,
  DIRECTORY_MODE,
  RECORD_FILE_MODE,
  VOLUME_FILE_MODE,
  classifyImageEntry,
  classifyVolumeEntry,
  DomainLayout,
  findGarbage,
  FIRST_VOLUME_SLOT,
  IDS_FILE_SIZE,
  LEASE_SLOT_SIZE,
  leaseOffset,
  parentImageOf,
  readDomainMetadata,
  readVolumeRecord,
  SdmeshError,
  GrpcStatus,
  type DomainMetadata,
  type GarbageItem,
  type VolumeRecord,
} from '@sdmesh/common';

/**
 * `sdmctl check`: verifies a storage domain's on-disk invariants by reading the storage
 * directly (no server needed). See docs/storage-format.md for the format it checks.
 *
 *  - the domain record and every volume record read back with a valid checksum and the ids
 *    of the place they lie in;
 *  - every committed volume has its data file and a lease slot inside the lease area (and,
 *    when sanlock formatted the slot, the lease there is named after the volume);
 *  - no two volumes (committed, in flight or deleted-but-not-collected) claim one slot;
 *  - every parent a volume names exists in its image (a thin clone's: the template's, which must be a template);
 *  - no volume is ILLEGAL unless an operation that may be writing it is still running (asked
 *    of the scheduler when one is reachable; otherwise ILLEGAL volumes are warnings);
 *  - the garbage the GC will remove is listed (it is not a violation).
 *
 * It takes no lease, so a transaction running meanwhile can show up as garbage or, rarely,
 * a record replaced between two reads: run it again before acting on a finding.
 */

export type Severity = 'violation' | 'warning';

export interface Finding {
  severity: Severity;
  /** Stable name of the invariant, e.g. "volume-metadata", "shared-lease-slot". */
  check: string;
  /** Path relative to the domain root, when the finding is about one file. */
  where: string;
  message: string;
  /** The storage module's reason for unreadable records (CHECKSUM_MISMATCH ...). */
  reason?: string;
}

export interface CheckReport {
  domainPath: string;
  domainId: string;
  domainName: string;
  images: number;
  volumes: number;
  illegalVolumes: number;
  violations: Finding[];
  warnings: Finding[];
  garbage: GarbageItem[];
  /** How ILLEGAL volumes were judged: against the scheduler's running operations, or not. */
  runningOperations: { checked: boolean; detail: string };
  ok: boolean;
}

/** Where active operations come from: resource names they target, or why they are unknown. */
export type ActiveTargets = () => Promise<{ targets: Set<string> } | { unavailable: string }>;

/** sanlock's on-disk paxos leader (struct leader_record, little-endian). */
const PAXOS_DISK_MAGIC = 0x06152010;
const NAME_ID_SIZE = 48;

export interface LeaseLeader {
  lockspace: string;
  resource: string;
}

const cString = (b: Buffer) => {
  const nul = b.indexOf(0);
  return b.subarray(0, nul < 0 ? b.length : nul).toString('latin1');
};

/** The sanlock lease record at a slot; undefined when the slot holds no sanlock record (zeros). */
export async function readLeaseLeader(leasesPath: string, slot: number): Promise<LeaseLeader | undefined> {
  const fh = await new ConfinedRoot(path.resolve(leasesPath, '..', '..')).openFile(leasesPath, { kind: 'lease-area' });
  try {
    const buf = Buffer.alloc(512);
    const { bytesRead } = await fh.read(buf, 0, 512, leaseOffset(slot));
    if (bytesRead < 152 || buf.readUInt32LE(0) !== PAXOS_DISK_MAGIC) return undefined;
    return { lockspace: cString(buf.subarray(56, 56 + NAME_ID_SIZE)), resource: cString(buf.subarray(104, 104 + NAME_ID_SIZE)) };
  } finally {
    await fh.close();
  }
}

/** What the check reads, confined to the domain: symlinks, FIFOs and devices are reported, never followed. */
let confined: ConfinedRoot;
let skippedEntries: Array<{ where: string; reason: string }> = [];
let wideModes: Array<{ where: string; mode: number; max: number }> = [];

async function readDir(dir: string, expect: Parameters<ConfinedRoot['list']>[1] = ['file', 'directory']): Promise<string[]> {
  try {
    const listing = await confined.list(dir, expect);
    for (const x of listing.skipped) skippedEntries.push({ where: path.join(confined.relative(dir), x.name), reason: x.reason });
    for (const e of listing.entries) {
      const p = path.join(dir, e.name);
      const st = await confined.lstat(p).catch(() => undefined);
      if (!st) continue;
      const max =
        e.type === 'directory'
          ? DIRECTORY_MODE
          : e.name.endsWith('.meta') || e.name.includes('.meta.') || e.name.startsWith('metadata')
            ? RECORD_FILE_MODE
            : VOLUME_FILE_MODE;
      if ((st.mode & 0o777 & ~max) !== 0) wideModes.push({ where: confined.relative(p), mode: st.mode & 0o777, max });
    }
    return listing.entries.map((e) => e.name);
  } catch (err) {
    if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return [];
    throw err;
  }
}

const isDir = async (p: string) => (await confined.lstat(p).catch(() => undefined))?.isDirectory() ?? false;
const sizeOf = async (p: string) => {
  const st = await confined.lstat(p).catch(() => undefined);
  return st?.isFile() ? st.size : undefined;
};

interface SlotClaim {
  volumeId: string;
  file: string;
  state: 'committed' | 'in flight' | 'deleted';
}

export async function checkDomain(domainPath: string, opts: { activeTargets?: ActiveTargets } = {}): Promise<CheckReport> {
  const root = path.resolve(domainPath);
  const layout = new DomainLayout(root);
  confined = new ConfinedRoot(root);
  skippedEntries = [];
  wideModes = [];
  const rel = (p: string) => path.relative(root, p) || '.';
  const findings: Finding[] = [];
  const add = (severity: Severity, check: string, where: string, message: string, reason?: string) =>
    findings.push({ severity, check, where, message, ...(reason ? { reason } : {}) });
  const report: CheckReport = {
    domainPath: root,
    domainId: '',
    domainName: '',
    images: 0,
    volumes: 0,
    illegalVolumes: 0,
    violations: [],
    warnings: [],
    garbage: [],
    runningOperations: { checked: false, detail: '' },
    ok: false,
  };
  const finish = () => {
    report.violations = findings.filter((f) => f.severity === 'violation');
    report.warnings = findings.filter((f) => f.severity === 'warning');
    report.ok = report.violations.length === 0;
    return report;
  };

  // 1. The domain record.
  let meta: DomainMetadata;
  try {
    meta = await readDomainMetadata(root);
  } catch (err) {
    const e = SdmeshError.from(err);
    const notDomain = e.code === GrpcStatus.NOT_FOUND;
    add('violation', 'domain-metadata', 'dom_md/metadata', notDomain ? `${root} is not a storage domain (no dom_md/metadata)` : e.message, e.reason);
    return finish();
  }
  report.domainId = meta.domainId;
  report.domainName = meta.name;
  const firstSlot = meta.firstVolumeSlot || FIRST_VOLUME_SLOT;
  const maxSlot = firstSlot + meta.maxVolumes - 1;

  const idsSize = await sizeOf(layout.idsPath);
  if (idsSize === undefined) add('violation', 'lease-area', 'dom_md/ids', 'the lockspace file is missing');
  else if (idsSize < IDS_FILE_SIZE) add('violation', 'lease-area', 'dom_md/ids', `the lockspace file is ${idsSize} bytes, expected ${IDS_FILE_SIZE}`);
  const leasesSize = await sizeOf(layout.leasesPath);
  if (leasesSize === undefined) add('violation', 'lease-area', 'dom_md/leases', 'the leases file is missing');

  // 2. Every volume record, committed or not, for the slot map; committed ones are checked.
  const committed: Array<{ record: VolumeRecord; file: string }> = [];
  const claims = new Map<number, SlotClaim[]>();
  const claim = (slot: number, c: SlotClaim) => claims.set(slot, [...(claims.get(slot) ?? []), c]);
  for (const imageName of await readDir(layout.imagesDir, ['directory'])) {
    const image = classifyImageEntry(imageName);
    const imageDir = path.join(layout.imagesDir, imageName);
    if (image.kind === 'foreign') {
      add('warning', 'foreign-entry', rel(imageDir), 'not a name sdmesh writes (ignored by every reader)');
      continue;
    }
    if (!(await isDir(imageDir))) {
      add('warning', 'foreign-entry', rel(imageDir), 'not a directory (ignored by every reader)');
      continue;
    }
    const names = await readDir(imageDir, ['file']);
    const present = new Set(names);
    let volumesHere = 0;
    for (const name of names) {
      const entry = classifyVolumeEntry(name);
      const file = path.join(imageDir, name);
      if (entry.kind === 'foreign') {
        if (image.kind === 'committed') add('warning', 'foreign-entry', rel(file), 'not a name sdmesh writes (ignored by every reader)');
        continue;
      }
      if (entry.kind !== 'meta' && entry.kind !== 'meta-tx' && entry.kind !== 'deleted-meta') continue;
      const isCommitted = image.kind === 'committed' && entry.kind === 'meta';
      const state: SlotClaim['state'] = image.kind === 'deleted' || entry.kind === 'deleted-meta' ? 'deleted' : isCommitted ? 'committed' : 'in flight';
      let record: VolumeRecord;
      try {
        record = await readVolumeRecord(file, isCommitted ? { volumeId: entry.volumeId, imageId: image.imageId, domainId: meta.domainId } : undefined);
      } catch (err) {
        const e = SdmeshError.from(err);
        // An unreadable uncommitted record was never committed: garbage, not a violation.
        if (state === 'in flight') add('warning', 'volume-metadata', rel(file), `uncommitted record unreadable (garbage): ${e.message}`, e.reason);
        else add('violation', 'volume-metadata', rel(file), e.message, e.reason);
        continue;
      }
      claim(record.leaseSlot, { volumeId: record.volumeId, file: rel(file), state });
      if (!isCommitted) continue;
      volumesHere++;
      committed.push({ record, file });
      if (!present.has(entry.volumeId)) add('violation', 'volume-data', rel(file), `volume ${entry.volumeId} has a record but no data file`);
    }
    if (image.kind === 'committed') {
      report.images++;
      if (volumesHere === 0 && !names.some((n) => classifyVolumeEntry(n).kind === 'meta'))
        add('warning', 'empty-image', rel(imageDir), 'committed image with no volume record');
    }
  }
  report.volumes = committed.length;

  // 3. Lease slots: in range, inside the lease area, named after the volume when formatted.
  let unformatted = 0;
  for (const { record, file } of committed) {
    const where = rel(file);
    const slot = record.leaseSlot;
    if (slot < firstSlot || slot > maxSlot) {
      add('violation', 'lease-slot', where, `LEASE_SLOT=${slot} is outside the volume slots ${firstSlot}..${maxSlot}`);
      continue;
    }
    if (leasesSize === undefined) continue;
    if (leasesSize < leaseOffset(slot) + LEASE_SLOT_SIZE) {
      add('violation', 'lease-slot', where, `lease slot ${slot} lies beyond the end of dom_md/leases (${leasesSize} bytes): the lease was never formatted`);
      continue;
    }
    const leader = await readLeaseLeader(layout.leasesPath, slot).catch(() => undefined);
    if (!leader) unformatted++;
    else if (leader.resource !== record.volumeId || leader.lockspace !== meta.domainId) {
      add('violation', 'lease-slot', where, `lease slot ${slot} holds the lease of ${leader.lockspace}:${leader.resource}, not of volume ${record.volumeId}`);
    }
  }
  if (unformatted > 0) {
    add(
      'warning',
      'lease-slot',
      'dom_md/leases',
      `${unformatted} volume lease slot(s) hold no sanlock lease record (domain formatted without a lease manager?); their names could not be verified`,
    );
  }

  // 4. No two volumes share a slot.
  for (const [slot, list] of [...claims.entries()].sort((a, b) => a[0] - b[0])) {
    const ids = new Set(list.map((c) => c.volumeId));
    if (ids.size < 2) continue;
    add(
      'violation',
      'shared-lease-slot',
      list[0]!.file,
      `lease slot ${slot} is claimed by ${ids.size} volumes: ${list.map((c) => `${c.volumeId} (${c.state}, ${c.file})`).join('; ')}`,
    );
  }

  // 5. Parents exist in their image: the volume's own, or (a thin clone's base) a template's
  //    image in this domain, where the parent must be the template's one base volume.
  const byImage = new Map<string, Map<string, VolumeRecord>>();
  for (const { record } of committed) byImage.set(record.imageId, (byImage.get(record.imageId) ?? new Map()).set(record.volumeId, record));
  for (const { record, file } of committed) {
    const parentImage = parentImageOf(record);
    const parent = record.parentId ? byImage.get(parentImage)?.get(record.parentId) : undefined;
    if (record.parentId && !parent) {
      add('violation', 'missing-parent', rel(file), `parent volume ${record.parentId} of ${record.volumeId} does not exist in image ${parentImage}`);
    } else if (parent && parentImage !== record.imageId && !parent.template) {
      add(
        'violation',
        'template-parent',
        rel(file),
        `parent volume ${record.parentId} of ${record.volumeId} lies in image ${parentImage}, which is not a template`,
      );
    }
    if (record.template && (record.parentId || byImage.get(record.imageId)!.size !== 1)) {
      add('violation', 'template-parent', rel(file), `template volume ${record.volumeId} must be the only volume of image ${record.imageId}, with no parent`);
    }
  }

  // 6. ILLEGAL volumes need a running operation.
  const illegal = committed.filter(({ record }) => record.legality === 'ILLEGAL');
  report.illegalVolumes = illegal.length;
  const active = opts.activeTargets ? await opts.activeTargets() : { unavailable: 'no scheduler address given (--address or SDMESH_ADDRESS)' };
  if ('targets' in active) {
    report.runningOperations = { checked: true, detail: `${active.targets.size} resource(s) targeted by running operations` };
    for (const { record, file } of illegal) {
      if (active.targets.has(`storageDomains/${meta.domainId}/disks/${record.imageId}`)) continue;
      add('violation', 'illegal-volume', rel(file), `volume ${record.volumeId} is ILLEGAL and no running operation targets disk ${record.imageId}`);
    }
  } else {
    report.runningOperations = { checked: false, detail: active.unavailable };
    for (const { record, file } of illegal) {
      add(
        'warning',
        'illegal-volume',
        rel(file),
        `volume ${record.volumeId} is ILLEGAL; whether an operation is still writing it is unknown: ${active.unavailable}`,
      );
    }
  }

  // 7. Garbage, for the record.
  report.garbage = await findGarbage(root);

  // 8. Hostile or odd entries (never followed) and permissions wider than sdmesh's.
  await readDir(layout.domMdDir, ['file']);
  for (const x of skippedEntries) add('warning', 'unexpected-entry-type', x.where, x.reason);
  for (const w of wideModes)
    add('warning', 'wide-permissions', w.where, `mode ${w.mode.toString(8).padStart(4, '0')} is wider than ${w.max.toString(8).padStart(4, '0')}`);
  return finish();
}

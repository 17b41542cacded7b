/**
 * One copy job, in its own process. It registers with the host's sanlock daemon, so the volume
 * leases the lease-manager acquires for it belong to this process: if the host loses the
 * lockspace, sanlock's kill path SIGKILLs exactly this worker, and qemu-img (started with
 * `setpriv --pdeathsig KILL`) dies with it. Protocol (docs/data-mover.md):
 *
 *   leases in the global lease order (domain id, volume id): source SHARED (waits), destination EXCLUSIVE (fails fast)
 *   → re-read both records; destination generation must equal the request's
 *   → write the destination record ILLEGAL (same generation, atomic)
 *   → qemu-img convert (-p progress to the parent) [→ qemu-img compare]
 *   → re-read: still ours? → write LEGAL and generation+1 in one atomic record write
 *   → release the leases, report, exit.
 */
import {
  audit,
  brokenForTest,
  createLogger,
  DomainLeases,
  encodeVolumeRecord,
  aborted,
  failedPrecondition,
  FIRST_CHILD_FD,
  holdLeasesInOrder,
  isLeaseHeldByAnother,
  LeaseHolder,
  leaseOffset,
  fail,
  Reason,
  newTxId,
  readVolumeRecord,
  SdmeshError,
  TX_INFIX,
  ConfinedRoot,
  setStorageGroup,
  type LeaseClaim,
  type Logger,
  type VolumeRecord,
} from '@sdmesh/common/worker';
import type { FileHandle } from 'node:fs/promises';
import { checkMerge, mergeData } from './merge';
import { dataBytes, inheritRegistration, ProgressThrottle, qemuImgMap, runQemuImg, startConvert } from './qemu';
import { openSourceFile, sourceFileSpec, type OpenedSourceFile } from './source-file';
import { runVolumeJob, type VolumeJobResult } from './volume-job';
import { rehearseCopySteps } from './warm-up';
import { checkCopy, checkImport, openVolumeChain, resolveVolume, type CopyPlan, type OpenedChain, type ResolvedVolume } from './volumes';
import { sendToParent, toWire, type CopyJobSpec, type ParentToWorker, type WorkerConfig, type WorkerToParent } from './worker-protocol';

const abort = new AbortController();
let log: Logger = createLogger('data-mover-worker');

/**
 * Milestones of this worker in ms since its process started (performance.now()), logged at
 * debug when the job ends: where a job's fixed cost goes (docs/data-mover.md, Benchmark).
 */
const timings: Record<string, number> = { modulesLoaded: Math.round(performance.now()) };
const mark = (name: string): void => {
  timings[name] = Math.round(performance.now());
};

/** The holder's close once the job's leases are released: awaited before the worker exits. */
let holderClosed: Promise<void> = Promise.resolve();

/**
 * Ends this worker's registration and connection to the lease-manager (its leases are released
 * already, in sanlock, by the holds that had them) without making the job's report wait for the
 * lease-manager's answers to the release notices: the worker exits only after them. Begun after
 * this turn of the event loop, so the report (sent in this turn) goes out before the release
 * notices' calls are started.
 */
function closeHolder(holder: LeaseHolder): void {
  holderClosed = new Promise<void>((resolve) => setImmediate(resolve)).then(() => holder.close().catch(() => undefined));
}

const send = (msg: WorkerToParent): Promise<void> => sendToParent(msg);

function abortError(): SdmeshError {
  const r: unknown = abort.signal.reason;
  return r instanceof SdmeshError ? r : fail(Reason.ABORTED, `job aborted: ${String(r)}`);
}

/** The generation this worker's job works under (its request's), for the audit trail. */
let jobGeneration = -1;

async function writeRecord(volume: ResolvedVolume, record: VolumeRecord, hostId: number): Promise<void> {
  await new ConfinedRoot(volume.domain.path).writeFileAtomic(volume.metaPath, encodeVolumeRecord(record), { tempSuffix: TX_INFIX + newTxId(hostId) });
  audit({ ...auditedWrite(volume, 'record'), recordGeneration: record.generation, legality: record.legality });
}

/** An audit line of this process writing a volume (packages/common/src/audit.ts). */
function auditedWrite(volume: ResolvedVolume, phase: 'record' | 'data-start' | 'data-end') {
  const host = process.env.SDMESH_HOST_NAME ?? '';
  return {
    kind: 'write' as const,
    phase,
    host,
    pid: process.pid,
    domain: volume.domain.id,
    volume: volume.volumeId,
    generation: jobGeneration,
    leaseOffset: leaseOffset(volume.record.leaseSlot),
    incarnation: volume.record.ctimeMs,
  };
}

/** Runs `write` (qemu-img writing the volume's data) between two audit lines. */
async function auditedData<T>(volume: ResolvedVolume, write: () => Promise<T>): Promise<T> {
  audit(auditedWrite(volume, 'data-start'));
  try {
    return await write();
  } finally {
    audit(auditedWrite(volume, 'data-end'));
  }
}

/** A volume's lease: the volume (the resource name), its domain (the lockspace) and its slot. */
interface LeaseTarget {
  domain: { id: string; path: string };
  volumeId: string;
  slot: number;
}

const leaseTargetOf = (v: ResolvedVolume): LeaseTarget => ({ domain: v.domain, volumeId: v.volumeId, slot: v.record.leaseSlot });

/** Does the volume as read now have its lease where `target` says? */
const leaseIsAt = (v: ResolvedVolume, target: LeaseTarget): boolean =>
  v.domain.id === target.domain.id && v.domain.path === target.domain.path && v.volumeId === target.volumeId && v.record.leaseSlot === target.slot;

/** A volume lease a job needs; a shared one is waited for up to waitMs, an exclusive one not at all. */
interface VolumeLeaseStep {
  volume: LeaseTarget;
  mode: 'shared' | 'exclusive';
  operationId: string;
  waitMs: number;
}

/**
 * A volume's lease as a claim for holdLeasesInOrder (the global lease order, so two jobs cannot
 * deadlock). Readers queue behind other readers on this host (sanlock allows one holder per
 * host) for up to waitMs; a busy destination fails at once, naming its holder.
 */
function volumeLeaseClaim(leases: DomainLeases, { volume, mode, operationId, waitMs }: VolumeLeaseStep): LeaseClaim {
  return {
    lockspace: volume.domain.id,
    resource: volume.volumeId,
    mode,
    hold: async (body) => {
      // Negative control of the chaos checker only (never on unless SDMESH_CHAOS_TEST=1): write without the lease.
      if (mode === 'exclusive' && brokenForTest('skip-destination-lease')) return body();
      const wait = mode === 'shared';
      const timeout = AbortSignal.timeout(waitMs);
      const signal = wait ? AbortSignal.any([abort.signal, timeout]) : abort.signal;
      log.info({ volume: volume.volumeId, domain: volume.domain.id, mode, slot: volume.slot }, 'acquiring volume lease');
      mark(`${mode}LeaseAsked`);
      let acquired = false;
      try {
        await leases.withVolumeLease(
          volume.domain,
          volume.volumeId,
          volume.slot,
          mode,
          operationId,
          () => {
            acquired = true;
            mark(`${mode}LeaseHeld`);
            return body();
          },
          { signal, wait },
        );
      } catch (err) {
        if (!acquired && wait && timeout.aborted && !abort.signal.aborted) {
          throw aborted(`the ${mode} lease of volume ${volume.volumeId} was still held by others after ${waitMs} ms`, Reason.LEASE_WAIT_TIMEOUT);
        }
        throw err;
      }
    },
  };
}

/** Files opened for a job's data step, closed by their user. */
interface Closable {
  close(): Promise<void>;
}

/** A copy's source chain and destination, opened before its data step (see underSourceAndDestination). */
interface OpenedCopy extends Closable {
  source: OpenedChain;
  target: OpenedChain;
}

/**
 * Opens a copy's source chain (read past the page cache: another host may have written the source
 * since this host last read it, and a copy must not read stale cached pages; qemu-img -T none, as
 * vdsm runs it) and its destination (O_DIRECT) at once. Either failing closes the other.
 */
async function openCopy(plan: CopyPlan): Promise<OpenedCopy> {
  const [source, target] = await Promise.allSettled([
    openVolumeChain(plan.source, { readDirect: true }),
    // Keeping its backing, the copy writes only its own layer: the parent may be filled meanwhile by its own job (issue 17).
    openVolumeChain(plan.destination, { write: true, unlockedAncestors: plan.keepBacking }),
  ]);
  if (source.status === 'fulfilled' && target.status === 'fulfilled') {
    return { source: source.value, target: target.value, close: () => Promise.all([source.value.close(), target.value.close()]).then(() => undefined) };
  }
  await Promise.all([source, target].map((r) => (r.status === 'fulfilled' ? r.value.close().catch(() => undefined) : undefined)));
  throw source.status === 'rejected' ? source.reason : (target as PromiseRejectedResult).reason;
}

/** The job's leases moved between the service's check and the worker's read under them (see underSourceAndDestination). */
class LeasesMoved extends Error {
  constructor(
    readonly source: LeaseTarget,
    readonly destination: LeaseTarget,
  ) {
    super("the volumes' records name other leases than the ones taken");
  }
}

/** How often a job starts over because the records named other leases than the ones it took, before it gives up. */
const MAX_LEASE_MOVES = 3;

/**
 * The frame of a job between two volumes (a copy or a merge): the source's lease shared and the
 * destination's exclusive in the global lease order, then the volumes read and `check`ed under
 * them (what it reads there is what counts), the destination marked ILLEGAL, and `body` with the
 * checked plan.
 *
 * The leases are taken first where the service found them when it checked the job (`leaseSlots`),
 * without reading the volumes before (that read was a job's largest fixed cost after the leases).
 * The read under the leases then also checks that the records still name exactly the leases held
 * (domain, volume, slot): a volume whose lease moved meanwhile (recreated with another slot) is
 * not protected by the lease taken, so the job lets go and starts over from what the records say.
 * A lease that cannot be taken where the service found it is looked up the same way before the
 * failure counts. Without `leaseSlots` the volumes are read and checked first (a bad job fails
 * before any lease).
 */
async function underSourceAndDestination<P extends { source: ResolvedVolume; destination: ResolvedVolume }, R, O extends Closable | undefined = undefined>(
  job: CopyJobSpec,
  config: WorkerConfig,
  prepared: Promise<LeaseHolder>,
  check: (source: ResolvedVolume, destination: ResolvedVolume) => P,
  body: (plan: P, opened: O) => Promise<R>,
  open?: (plan: P) => Promise<O>,
): Promise<R> {
  const holder = await prepared;
  // Not waited for: the service needs nothing from it before the leases (IPC keeps the messages in order).
  void send({ type: 'registered', pid: process.pid });
  // The two reads are independent: at once (they are part of every job's fixed cost).
  const readBoth = () => Promise.all([resolveVolume('source', job.source), resolveVolume('destination', job.destination)]);
  const fromRecords = async () => {
    const pre = check(...(await readBoth()));
    return { source: leaseTargetOf(pre.source), destination: leaseTargetOf(pre.destination) };
  };
  try {
    const leases = new DomainLeases(holder);
    let hinted = hintedLeaseTargets(job);
    let targets = hinted ?? (await fromRecords());
    if (abort.signal.aborted) throw abortError();
    mark('checked');
    // No 'acquiring-leases' report: the service shows that phase from the job's start (each report is a
    // job update and a message to every watcher, on the job's path).
    for (let moves = 0; ; moves++) {
      const at = targets;
      const claims = [
        volumeLeaseClaim(leases, { volume: at.source, mode: 'shared', operationId: job.jobId, waitMs: config.sourceLeaseWaitMs }),
        volumeLeaseClaim(leases, { volume: at.destination, mode: 'exclusive', operationId: job.jobId, waitMs: config.sourceLeaseWaitMs }),
      ];
      let held = false;
      try {
        return await holdSourceAndDestination(leases, at, job.jobId, claims, async () => {
          held = true;
          mark('leasesHeld');
          const [source, destination] = await readBoth();
          if (!leaseIsAt(source, at.source) || !leaseIsAt(destination, at.destination)) {
            throw new LeasesMoved(leaseTargetOf(source), leaseTargetOf(destination));
          }
          const plan = check(source, destination);
          if (abort.signal.aborted) throw abortError();
          const dst = plan.destination;
          // The files the data step uses are opened while the record is written: an open writes
          // nothing, and the writer (qemu-img) starts only after the ILLEGAL record is durable.
          const opening = open?.(plan);
          opening?.catch(() => undefined);
          try {
            if (dst.record.legality !== 'ILLEGAL') await writeRecord(dst, { ...dst.record, legality: 'ILLEGAL' }, config.hostId);
          } catch (err) {
            await opening?.then((o) => o?.close()).catch(() => undefined);
            throw err;
          }
          mark('markedIllegal');
          await send({ type: 'marked-illegal' });
          // From here body owns (and closes) what was opened.
          return body(plan, (await opening) as O);
        });
      } catch (err) {
        if (abort.signal.aborted) throw abortError();
        let next: typeof targets | undefined;
        if (err instanceof LeasesMoved) next = { source: err.source, destination: err.destination };
        else if (!held && hinted) {
          // Not taken where the service found it: only a failure if the records still name that lease.
          const now = await fromRecords();
          if (!sameTarget(now.source, at.source) || !sameTarget(now.destination, at.destination)) next = now;
        }
        if (!next) throw err;
        if (moves + 1 >= MAX_LEASE_MOVES) {
          throw fail(Reason.VOLUME_CHANGED, `the volumes' leases moved ${MAX_LEASE_MOVES} times while this job took them: giving up (run the job again)`);
        }
        log.warn({ was: at, now: next }, 'the records name other leases than the ones the job took: taking those');
        hinted = undefined;
        targets = next;
      }
    }
  } finally {
    mark('leasesReleased');
    closeHolder(holder);
  }
}

/**
 * The job's two leases, the source's shared and the destination's exclusive, held while body runs:
 * first both in one lease-manager call and one sanlock acquire (issue 17: the copy's fixed cost),
 * all or none and without waiting, so no lease order is needed (nothing is held while waiting). If
 * one of them is busy (another reader of the source on this host, a writer elsewhere, a busy
 * destination) nothing was taken, and the claims are taken one by one in the global lease order as
 * before: the source waited for, a busy destination failing at once naming its holder.
 */
async function holdSourceAndDestination<R>(
  leases: DomainLeases,
  at: { source: LeaseTarget; destination: LeaseTarget },
  operationId: string,
  claims: LeaseClaim[],
  body: () => Promise<R>,
): Promise<R> {
  // The chaos checker's negative control takes the claims, one of which skips the destination's lease.
  if (brokenForTest('skip-destination-lease')) return holdLeasesInOrder(claims, body);
  const volumes = [
    { ...at.source, mode: 'shared' as const },
    { ...at.destination, mode: 'exclusive' as const },
  ];
  mark('leasesAsked');
  let acquired = false;
  try {
    const holding = leases.withVolumeLeases(
      volumes,
      operationId,
      () => {
        acquired = true;
        return body();
      },
      { signal: abort.signal, wait: false },
    );
    // Logged while the call is on its way, not before it.
    setImmediate(() => log.info({ source: at.source.volumeId, destination: at.destination.volumeId }, 'acquiring both volume leases at once'));
    return await holding;
  } catch (err) {
    if (acquired || abort.signal.aborted || !isLeaseHeldByAnother(err)) throw err;
    log.info({ err: String(err) }, 'a lease of the job is busy: taking them one by one, the source waited for');
  }
  return holdLeasesInOrder(claims, body);
}

const sameTarget = (a: LeaseTarget, b: LeaseTarget): boolean =>
  a.domain.id === b.domain.id && a.domain.path === b.domain.path && a.volumeId === b.volumeId && a.slot === b.slot;

/** The leases where the service found them (the job's leaseSlots), as lease targets; undefined without them. */
function hintedLeaseTargets(job: CopyJobSpec): { source: LeaseTarget; destination: LeaseTarget } | undefined {
  const slots = job.leaseSlots;
  if (!slots || !job.source) return undefined;
  const target = (ref: { domainPath: string; volumeId: string }, at: { domainId: string; slot: number }): LeaseTarget => ({
    domain: { id: at.domainId, path: ref.domainPath },
    volumeId: ref.volumeId,
    slot: at.slot,
  });
  return { source: target(job.source, slots.source), destination: target(job.destination, slots.destination) };
}

function runCopy(job: CopyJobSpec, config: WorkerConfig, prepared: Promise<LeaseHolder>): Promise<{ generation: number; verified: boolean }> {
  const opts = { collapse: job.collapse, destinationGeneration: job.destinationGeneration };
  return underSourceAndDestination(
    job,
    config,
    prepared,
    (source, destination) => checkCopy(source, destination, opts),
    async (plan, opened: OpenedCopy) => {
      const dst = plan.destination;
      log.info({ destination: dst.volumeId, generation: dst.record.generation }, 'destination marked ILLEGAL; copying');
      void send({ type: 'phase', phase: 'copying' });
      await copyData(plan, job, opened);
      let verified = false;
      if (job.verify) {
        await send({ type: 'phase', phase: 'verifying' });
        await verifyCopy(plan);
        verified = true;
      }
      void send({ type: 'phase', phase: 'committing' });
      // A metadata-tx update (generation bump) may have fenced us meanwhile: then the copy is
      // not ours to commit.
      const committed = await commit(job, dst, config);
      return { generation: committed.generation, verified };
    },
    openCopy,
  );
}

/**
 * A merge (merge.ts): the copy's leases and protocol (source shared, destination exclusive;
 * destination ILLEGAL, the data, then LEGAL with generation + 1), with qemu-img commit or rebase
 * as the data step. The destination's capacity grows to the source's in the same record write.
 */
function runMerge(job: CopyJobSpec, config: WorkerConfig, prepared: Promise<LeaseHolder>): Promise<{ generation: number; verified: boolean }> {
  const opts = { destinationGeneration: job.destinationGeneration };
  return underSourceAndDestination(
    job,
    config,
    prepared,
    (source, destination) => checkMerge(source, destination, opts),
    async (plan) => {
      const dst = plan.destination;
      log.info(
        { mode: plan.mode, source: plan.source.volumeId, destination: dst.volumeId, generation: dst.record.generation },
        'destination marked ILLEGAL; merging',
      );
      await send({ type: 'phase', phase: 'merging' });
      const total = plan.source.record.capacityBytes;
      await auditedData(dst, () =>
        mergeData(plan, {
          signal: abort.signal,
          rateLimitBytesPerSecond: job.rateLimitBytesPerSecond,
          onPercent: (percent) => void send({ type: 'progress', percent, dataBytes: total, totalBytes: total }),
          onStarted: (pid) => log.info({ pid, mode: plan.mode }, 'qemu-img merge started'),
        }),
      );
      mark('merged');
      await send({ type: 'progress', percent: 100, dataBytes: total, totalBytes: total });
      await send({ type: 'phase', phase: 'committing' });
      return commit(job, dst, config, { capacityBytes: plan.capacityBytes });
    },
  );
}

/**
 * An import: a plain file of this host into a destination volume. Same protocol as a copy, but
 * the source is not a volume, so there is no source lease: only the destination's exclusive
 * lease. The file is inspected again here (it may have changed since the service checked it).
 */
async function runImport(
  job: CopyJobSpec,
  sourcePath: string,
  config: WorkerConfig,
  prepared: Promise<LeaseHolder>,
): Promise<{ generation: number; verified: boolean }> {
  const holder = await prepared;
  await send({ type: 'registered', pid: process.pid });
  let file: OpenedSourceFile | undefined;
  try {
    const leases = new DomainLeases(holder);
    const opts = { destinationGeneration: job.destinationGeneration };
    const pre = await resolveVolume('destination', job.destination);
    // Opened once: inspected and copied from this one descriptor, and it must be the file the service accepted.
    file = await openSourceFile(sourcePath, config.importDirs, { signal: abort.signal, expect: job.sourceIdentity });
    checkImport(file, pre, opts);
    if (abort.signal.aborted) throw abortError();
    mark('checked');
    await send({ type: 'phase', phase: 'acquiring-leases' });
    const source = file;
    const claims = [volumeLeaseClaim(leases, { volume: leaseTargetOf(pre), mode: 'exclusive', operationId: job.jobId, waitMs: config.sourceLeaseWaitMs })];
    return await holdLeasesInOrder(claims, async () => {
      mark('leasesHeld');
      const dst = await resolveVolume('destination', job.destination);
      checkImport(source, dst, opts);
      if (abort.signal.aborted) throw abortError();
      if (dst.record.legality !== 'ILLEGAL') await writeRecord(dst, { ...dst.record, legality: 'ILLEGAL' }, config.hostId);
      mark('markedIllegal');
      await send({ type: 'marked-illegal' });
      log.info(
        { destination: dst.volumeId, generation: dst.record.generation, sourceFile: source.path, format: source.format },
        'destination marked ILLEGAL; importing',
      );
      await send({ type: 'phase', phase: 'copying' });
      const sourceImage = { spec: sourceFileSpec(source.format), format: source.format, handles: [source.handle] };
      await convertInto(dst, { ...sourceImage, capacityBytes: source.virtualSize, keepBacking: false }, job);
      if (job.verify) {
        await send({ type: 'phase', phase: 'verifying' });
        await compareImages({ ...sourceImage, name: source.path }, dst);
      }
      await send({ type: 'phase', phase: 'committing' });
      return commit(job, dst, config);
    });
  } finally {
    await file?.handle.close().catch(() => undefined);
    mark('leasesReleased');
    closeHolder(holder);
  }
}

/** A volume job (volume-job.ts): an in-place change of one volume under its exclusive lease. */
async function runVolume(job: CopyJobSpec, config: WorkerConfig, prepared: Promise<LeaseHolder>): Promise<VolumeJobResult> {
  const holder = await prepared;
  await send({ type: 'registered', pid: process.pid });
  try {
    const leases = new DomainLeases(holder);
    mark('checked');
    return await runVolumeJob(job, {
      send,
      signal: abort.signal,
      abortError,
      exclusiveLease: (volume) =>
        volumeLeaseClaim(leases, { volume: leaseTargetOf(volume), mode: 'exclusive', operationId: job.jobId, waitMs: config.sourceLeaseWaitMs }),
      holdLeases: holdLeasesInOrder,
      writeRecord: (volume, record) => writeRecord(volume, record, config.hostId),
    });
  } finally {
    mark('leasesReleased');
    closeHolder(holder);
  }
}

/**
 * Marks the destination LEGAL with generation+1, unless a fence moved its generation meanwhile.
 * Only its record is read again (not its chain): the generation is what a fence changes, and the
 * rest was checked under the lease the job still holds.
 */
async function commit(
  job: CopyJobSpec,
  destination: ResolvedVolume,
  config: WorkerConfig,
  patch: Partial<Pick<VolumeRecord, 'capacityBytes'>> = {},
): Promise<{ generation: number; verified: boolean }> {
  const { volumeId } = destination;
  const record = await readVolumeRecord(destination.metaPath, { volumeId, imageId: destination.imageId, domainId: destination.domain.id });
  if (record.generation !== job.destinationGeneration) {
    throw failedPrecondition(
      `destination volume ${volumeId} moved to generation ${record.generation} while this job copied (it expected ${job.destinationGeneration}): the copy was fenced, the volume stays ILLEGAL`,
      Reason.GENERATION_MISMATCH,
    );
  }
  const generation = record.generation + 1;
  await writeRecord({ ...destination, record }, { ...record, ...patch, legality: 'LEGAL', generation }, config.hostId);
  mark('committed');
  log.info({ destination: volumeId, generation }, 'destination LEGAL');
  return { generation, verified: !!job.verify };
}

/** The copy's data step, on its opened files (openCopy); closes them. */
async function copyData(plan: CopyPlan, job: CopyJobSpec, opened: OpenedCopy): Promise<void> {
  const { source, destination, keepBacking } = plan;
  const chain = opened.source;
  mark('sourceOpened');
  try {
    await convertInto(
      destination,
      { spec: chain.spec(FIRST_CHILD_FD), format: source.record.format, handles: chain.handles, capacityBytes: source.record.capacityBytes, keepBacking },
      job,
      opened.target,
    );
  } finally {
    await chain.close();
  }
}

/** A source as qemu-img gets it: a json: spec over already-opened files (fds 3 ...). */
interface SourceImage {
  spec: string;
  format: 'RAW' | 'QCOW2';
  handles: FileHandle[];
}

/**
 * qemu-img convert of a source (a volume's chain, or an import's file) into the destination
 * volume, then fsync. Every file is an fd opened here or by the caller (confined, type-checked);
 * the destination spec states its own backing chain, so no header name is ever resolved.
 */
async function convertInto(
  destination: ResolvedVolume,
  source: SourceImage & { capacityBytes: number; keepBacking: boolean },
  job: CopyJobSpec,
  opened?: OpenedChain,
): Promise<void> {
  const { keepBacking } = source;
  const total = source.capacityBytes;
  // How much data the source holds only weighs the progress reports (MB/s, bytes copied): qemu-img
  // map runs beside the convert, not before it, and only once the convert has run MAP_DELAY_MS: a
  // copy done sooner (most of a small job's time is its fixed cost) counts the source's allocated
  // blocks instead of paying a second qemu-img start that competes with the convert for the CPU.
  // Percentages that arrive before the figure are sent once it is there.
  let data: number | undefined;
  let measure!: (how: 'map' | 'allocated') => void;
  // Percentages are held back until the data figure is there, and spaced PROGRESS_INTERVAL_MS apart.
  const throttle = new ProgressThrottle(PROGRESS_INTERVAL_MS);
  const sendProgress = (percent: number | undefined) => {
    if (percent !== undefined) void send({ type: 'progress', percent, dataBytes: data!, totalBytes: total });
  };
  const layers = keepBacking ? source.handles.slice(0, 1) : source.handles;
  const allocated = async () => (await Promise.all(layers.map((h) => h.stat()))).reduce((sum, st) => sum + st.blocks * 512, 0);
  // The map is only for the progress figures: once the convert is done it is stopped, not waited for.
  const mapStop = new AbortController();
  const mapped = new Promise<'map' | 'allocated'>((resolve) => (measure = resolve)).then(async (how) => {
    if (how === 'allocated') data = await allocated();
    else {
      try {
        const signal = AbortSignal.any([abort.signal, mapStop.signal]);
        data = await dataBytes(qemuImgMap(source.spec, source.format, source.handles, signal), keepBacking ? 0 : Infinity);
      } catch (err) {
        if (abort.signal.aborted || !mapStop.signal.aborted) throw err;
        data = await allocated();
      }
    }
    mark('mapped');
    sendProgress(throttle.flush());
    return data;
  });
  // A single raw layer's allocated blocks are its data (what the map would say): counted at once, no map.
  const rawLayer = source.format === 'RAW' && layers.length === 1;
  const mapTimer = rawLayer ? undefined : setTimeout(() => measure('map'), MAP_DELAY_MS);
  if (rawLayer) measure('allocated');
  // Awaited below; a failure must not be reported as unhandled meanwhile.
  mapped.catch(() => undefined);
  const onPercent = (percent: number) => (data === undefined ? throttle.hold(percent) : sendProgress(throttle.offer(percent)));
  const parent = destination.ancestors[0];
  // The destination as the caller opened it (openCopy), or opened here. Keeping its backing, the
  // copy writes only its own layer: the parent may be filled meanwhile by its own job (issue 17).
  const target = await (opened ? Promise.resolve(opened) : openVolumeChain(destination, { write: true, unlockedAncestors: keepBacking })).catch(
    async (err: unknown) => {
      clearTimeout(mapTimer);
      measure('allocated');
      await mapped.catch(() => undefined);
      throw err;
    },
  );
  mark('destinationOpened');
  audit(auditedWrite(destination, 'data-start'));
  try {
    const convert = startConvert(
      {
        source: source.spec,
        sourceFormat: source.format,
        destination: target.spec(FIRST_CHILD_FD + source.handles.length),
        destinationFormat: destination.record.format,
        backing: keepBacking && parent ? { file: parent.volumeId, format: parent.format } : undefined,
        preallocated: destination.record.allocation === 'PREALLOCATED',
        rateLimitBytesPerSecond: job.rateLimitBytesPerSecond,
      },
      onPercent,
      [...source.handles, ...target.handles],
    );
    const onAbort = () => convert.kill(abortError().message);
    abort.signal.addEventListener('abort', onAbort);
    mark('convertSpawned');
    log.info({ pid: convert.child.pid, destination: destination.dataPath }, 'qemu-img convert started');
    try {
      await convert.done;
    } finally {
      abort.signal.removeEventListener('abort', onAbort);
      // Done before the map started: no map; a map still running is stopped (the data is copied).
      clearTimeout(mapTimer);
      measure('allocated');
      mapStop.abort();
    }
    mark('converted');
    // The data must be on stable storage before the record says LEGAL: qemu-img wrote it O_DIRECT
    // (past this host's page cache), and the fsync flushes the storage's own write cache and the
    // file's allocation metadata.
    await target.handles[0]!.sync();
    mark('fsynced');
  } finally {
    // The map holds the worker's registration too (every qemu-img does): it ends before the leases can.
    clearTimeout(mapTimer);
    measure('allocated');
    mapStop.abort();
    await mapped.catch(() => undefined);
    await target.close();
    audit(auditedWrite(destination, 'data-end'));
  }
  await send({ type: 'progress', percent: 100, dataBytes: await mapped, totalBytes: total });
}

/** How long a convert runs before qemu-img map is started beside it (see convertInto). */
const MAP_DELAY_MS = 250;

/** The shortest time between two progress reports of a convert (see convertInto). */
const PROGRESS_INTERVAL_MS = 100;

/** qemu-img compare of the guest-visible content (through both chains). */
async function verifyCopy(plan: CopyPlan): Promise<void> {
  const { source, destination } = plan;
  const chain = await openVolumeChain(source);
  try {
    await compareImages({ spec: chain.spec(FIRST_CHILD_FD), format: source.record.format, handles: chain.handles, name: source.volumeId }, destination);
  } finally {
    await chain.close();
  }
}

async function compareImages(a: SourceImage & { name: string }, destination: ResolvedVolume): Promise<void> {
  const b: OpenedChain = await openVolumeChain(destination);
  try {
    const bSpec = b.spec(FIRST_CHILD_FD + a.handles.length);
    const args = ['compare', '-U', '-f', a.format.toLowerCase(), '-F', destination.record.format.toLowerCase(), a.spec, bSpec];
    const { code, stdout } = await runQemuImg(args, { signal: abort.signal, okCodes: [1], files: [...a.handles, ...b.handles] });
    if (code === 1) {
      throw fail(Reason.VERIFY_MISMATCH, `verify failed: destination ${destination.volumeId} differs from source ${a.name}: ${stdout.trim()}`);
    }
  } finally {
    await b.close();
  }
}

/**
 * Registers with the host's sanlock daemon (kill path: this pid) and opens the connection to the
 * lease-manager, so a job starts with both ready. Holds no lease.
 */
async function prepare(config: WorkerConfig): Promise<LeaseHolder> {
  setStorageGroup(config.storageGroupId);
  const holder = await LeaseHolder.register({ leaseManagerAddress: config.leaseManagerAddress, log });
  // Every qemu-img of this worker holds the registration too: its leases outlive neither.
  inheritRegistration(holder.registrationFd);
  mark('registered');
  // The first call on a gRPC channel pays its connect (≈ 30 ms here): do it before the job.
  await holder.leaseManager.listLockspaces({}, { timeoutMs: 5000 }).catch((err: unknown) => log.warn({ err: String(err) }, 'lease-manager did not answer yet'));
  mark('prepared');
  return holder;
}

/** The rehearsal of a job's storage steps (warm-up.ts) a prepared worker runs while it waits; awaited before it exits. */
let rehearsal: Promise<void> = Promise.resolve();

function main(): void {
  if (!process.send) {
    process.stderr.write('copy-worker: must be started by the data-mover service (IPC channel missing)\n');
    process.exit(2);
  }
  let started = false;
  let prepared: Promise<LeaseHolder> | undefined;
  process.on('message', (msg: ParentToWorker) => {
    if (msg.type === 'prepare') {
      if (prepared) return;
      log = createLogger('data-mover-worker', msg.config.logLevel, msg.config.hostName);
      prepared = prepare(msg.config);
      // Not part of `prepared`: a job that comes meanwhile starts at once, and the rehearsal skips what it has left (they share the event loop).
      const hostId = msg.config.hostId;
      rehearsal = prepared.then(
        () =>
          rehearseCopySteps(hostId, undefined, () => started)
            .then(
              () => mark('rehearsed'),
              (err: unknown) => log.debug({ err: String(err) }, 'rehearsal of the copy steps failed (the job runs without it)'),
            )
            // Done starting: the service stops pausing this worker while jobs start (jobs.ts, pauseStarting).
            .then(() => send({ type: 'ready' })),
        () => undefined,
      );
      prepared.catch((err: unknown) => {
        // Registered halfway, nothing to retry safely (one registration per process): an idle
        // worker exits and the service starts another; a started job reports the error.
        log.warn({ err: String(err) }, 'cannot register with sanlock');
        if (!started) process.exit(3);
      });
      return;
    }
    if (msg.type === 'abort') {
      log.warn({ reason: msg.reason }, 'abort requested');
      abort.abort(fail(Reason.ABORTED, `job aborted: ${msg.reason}`));
      return;
    }
    if (msg.type !== 'start' || started) return;
    started = true;
    jobGeneration = msg.job.destinationGeneration;
    mark('startReceived');
    log = createLogger('data-mover-worker', msg.config.logLevel, msg.config.hostName).child({ jobId: msg.job.jobId });
    // A parent that sent no prepare: register now.
    prepared ??= prepare(msg.config);
    const holder = prepared;
    const job = msg.job;
    const run: Promise<{ generation: number; verified?: boolean; bytesFreed?: number }> = job.volumeOp
      ? runVolume(job, msg.config, holder)
      : job.sourceFile
        ? runImport(job, job.sourceFile, msg.config, holder)
        : job.merge
          ? runMerge(job, msg.config, holder)
          : runCopy(job, msg.config, holder);
    run
      .then((r) => send({ type: 'done', generation: r.generation, verified: !!r.verified, bytesFreed: r.bytesFreed }))
      .catch((err: unknown) => {
        const wire = abort.signal.aborted ? toWire(abortError()) : toWire(err);
        log.warn({ error: wire }, 'copy failed');
        return send({ type: 'failed', error: wire });
      })
      .finally(async () => {
        mark('reported');
        log.debug({ timings }, 'job timings (ms since the worker process started)');
        await Promise.all([holderClosed, rehearsal]);
        process.exit(0);
      });
  });
  // The service went away: stop (pdeathsig normally kills us first).
  process.on('disconnect', () => {
    abort.abort(fail(Reason.ABORTED, 'the data-mover service exited'));
    setTimeout(() => process.exit(1), 2000).unref();
  });
}

main();

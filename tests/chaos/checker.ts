import type { AuditLine } from '@sdmesh/common';
import type { HistoryLine } from './history';

/** One broken invariant, with the history lines that show it. */
export interface Violation {
  invariant: 1 | 2 | 3 | 4 | 5;
  message: string;
  /** Monotonic µs of the moment it is about (for the history excerpt). */
  t?: number;
  /** Ids (disk, volume, pid, operation) whose history lines make up the excerpt. */
  about: string[];
}

/** What the run observed after it settled, for the checker (no knowledge of how the mesh works inside). */
export interface Observed {
  /** Operations the scheduler lists that are not DONE, FAILED or ABORTED. */
  unfinishedOperations: Array<{ name: string; status: string }>;
  /** Disks listed by the public API, per domain. */
  listedDisks: Array<{ id: string; domainId: string; legal: boolean; /** Operations whose target it is (for the excerpt). */ operations?: string[] }>;
  /** Disks of the history whose content was read back, and whether it matched the last patterns written. */
  contents: Array<{ id: string; ok: boolean; detail?: string }>;
  /** Disks a disk-locking operation was refused for after the settle (a lock left held). */
  lockedDisks: Array<{ id: string; reason: string }>;
  /** Volume leases still held after the settle (host, resource, holder pid). */
  heldLeases: Array<{ host: string; lockspace: string; resource: string; pid: number; mode: string }>;
  /** Garbage left after the GC passes, and sdmctl check's violations, per domain. */
  garbage: Array<{ domain: string; items: string[] }>;
  checkFindings: Array<{ domain: string; check: string; where: string; message: string }>;
  /** Where the KV inventory (domain registry, ListDisks) and storage (the format readers) disagree, after the GC. */
  inventory: Array<{ domain: string; message: string }>;
  /** Files outside the domains whose bytes changed, appeared or vanished. */
  outsideChanges: string[];
  /** When each audited writer pid was last seen alive and first seen gone (monotonic µs). */
  deaths: Map<number, { lastAlive: number; firstDead: number }>;
  /** End of the run (monotonic µs): intervals still open end here. */
  end: number;
}

/** An observation with nothing found yet (filled by the run; tests start from it). */
export function emptyObservation(): Observed {
  return {
    unfinishedOperations: [],
    listedDisks: [],
    contents: [],
    lockedDisks: [],
    heldLeases: [],
    garbage: [],
    checkFindings: [],
    inventory: [],
    outsideChanges: [],
    deaths: new Map(),
    end: 0,
  };
}

/** Disks the history says exist at the end: created/copied/imported/cloned and not deleted since. */
export interface ExpectedDisk {
  id: string;
  domainId: string;
}

interface Interval {
  pid: number;
  start: number;
  /** Upper bound of its end, and the last moment it surely still ran. */
  end: number;
  surelyUntil: number;
  what: string;
}

/**
 * The checker: the five invariants of docs/chaos.md over the history, the audit trail and what
 * the settled mesh shows. It knows the public API's words (operations, disks, patterns, leases,
 * writes), not how the services work.
 */
export function check(history: HistoryLine[], auditLines: AuditLine[], expected: ExpectedDisk[], obs: Observed): Violation[] {
  const v: Violation[] = [];

  // 1. Every operation ended; nothing it held is still held.
  for (const op of obs.unfinishedOperations) v.push({ invariant: 1, message: `operation ${op.name} is still ${op.status} after the settle`, about: [op.name] });
  for (const out of history) {
    if (out.kind === 'outcome' && out.outcome === 'unfinished') {
      v.push({ invariant: 1, message: `operation ${out.operationName} (${out.op}) did not end while its client waited`, t: out.t, about: [out.requestId] });
    }
  }
  for (const l of obs.lockedDisks) v.push({ invariant: 1, message: `disk ${l.id} is still locked after every operation ended: ${l.reason}`, about: [l.id] });
  for (const l of obs.heldLeases) {
    v.push({
      invariant: 1,
      message: `${l.mode} lease ${l.lockspace}/${l.resource} still held by pid ${l.pid} on ${l.host} after every operation ended`,
      about: [l.resource],
    });
  }

  // 2. Every disk of the history is listed, LEGAL, with the last patterns written; no other disk is visible.
  const listed = new Map(obs.listedDisks.map((d) => [d.id, d]));
  for (const e of expected) {
    const d = listed.get(e.id);
    if (!d) v.push({ invariant: 2, message: `disk ${e.id} (domain ${e.domainId}) exists in the history but is not listed`, about: [e.id] });
    else if (d.domainId !== e.domainId)
      v.push({ invariant: 2, message: `disk ${e.id} is listed in domain ${d.domainId}, the history says ${e.domainId}`, about: [e.id] });
    else if (!d.legal) v.push({ invariant: 2, message: `disk ${e.id} is not LEGAL`, about: [e.id] });
  }
  const expectedIds = new Set(expected.map((e) => e.id));
  for (const d of obs.listedDisks) {
    if (!expectedIds.has(d.id))
      v.push({
        invariant: 2,
        message: `disk ${d.id} is listed in domain ${d.domainId} but no DONE operation of the history made it (a partial disk${d.operations?.length ? `; target of ${d.operations.join(', ')}` : ''})`,
        about: [d.id, ...(d.operations ?? [])],
      });
  }
  for (const c of obs.contents)
    if (!c.ok) v.push({ invariant: 2, message: `disk ${c.id}: guest-visible content is not the last pattern written (${c.detail ?? ''})`, about: [c.id] });
  for (const h of history) {
    if (h.kind === 'content-check' && !h.ok)
      v.push({ invariant: 2, message: `disk ${h.disk} during the run: ${h.detail ?? 'content differs'}`, t: h.t, about: [h.disk] });
  }

  // 3. Never two writers on one volume; every write under its writer's exclusive lease and the current generation.
  v.push(...checkWriters(history, auditLines, obs));

  // 4. No garbage after the GC, sdmctl check clean, the KV inventory equals storage.
  for (const g of obs.garbage)
    if (g.items.length)
      v.push({ invariant: 4, message: `domain ${g.domain}: garbage left after the GC passes: ${g.items.slice(0, 5).join(', ')}`, about: [g.domain] });
  for (const f of obs.checkFindings)
    v.push({ invariant: 4, message: `sdmctl check of domain ${f.domain}: ${f.check} at ${f.where}: ${f.message}`, about: [f.where] });
  for (const m of obs.inventory) {
    const ids = m.message.match(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g) ?? [];
    v.push({ invariant: 4, message: `KV inventory vs storage, domain ${m.domain}: ${m.message}`, about: ids.length ? ids.slice(0, 3) : [m.domain] });
  }

  // 5. Nothing outside the domains changed.
  for (const c of obs.outsideChanges) v.push({ invariant: 5, message: `outside the domains: ${c}`, about: [c] });
  return v;
}

function checkWriters(history: HistoryLine[], audit: AuditLine[], obs: Observed): Violation[] {
  const v: Violation[] = [];
  const deathOf = (pid: number) => obs.deaths.get(pid);
  const ends = (pid: number) => {
    const d = deathOf(pid);
    return d ? { end: d.firstDead, surelyUntil: d.lastAlive } : { end: obs.end, surelyUntil: obs.end };
  };
  // A lease is its name and its place: a volume id can have two leases in one domain at once (a disk
  // moved away and back keeps its volume ids; the old incarnation waits for the GC in its own slot).
  const key = (lockspace: string, resource: string, offset?: number) => `${lockspace}/${resource}@${offset ?? '?'}`;

  // Exclusive lease intervals, per lease: from the grant to its release or its holder's death.
  const leases = new Map<string, Interval[]>();
  for (const a of audit) {
    if (a.kind === 'lease-grant' && a.mode === 'exclusive') {
      const list = leases.get(key(a.lockspace, a.resource, a.offset)) ?? [];
      list.push({ pid: a.pid, start: a.t, ...ends(a.pid), what: `exclusive lease of pid ${a.pid} on ${a.host} (lver ${a.lver ?? '?'})` });
      leases.set(key(a.lockspace, a.resource, a.offset), list);
    } else if (a.kind === 'lease-release' && a.mode === 'exclusive') {
      const open = leases
        .get(key(a.lockspace, a.resource, a.offset))
        ?.filter((i) => i.pid === a.pid && i.start <= a.t)
        .at(-1);
      if (open) {
        open.end = a.t;
        open.surelyUntil = a.t;
      }
    }
  }
  for (const [k, list] of leases) v.push(...overlaps(k, list, 'two exclusive lease holders'));

  // Data writes (the writers' own intervals and the clients' guest writes), per volume.
  const writes = new Map<string, Interval[]>();
  const addWrite = (k: string, i: Interval) => writes.set(k, [...(writes.get(k) ?? []), i]);
  const open = new Map<string, AuditLine & { kind: 'write' }>();
  for (const a of audit) {
    if (a.kind !== 'write') continue;
    const k = key(a.domain, a.volume, a.leaseOffset);
    // Inside an exclusive lease of its own process?
    const under = leases.get(k)?.some((i) => i.pid === a.pid && i.start <= a.t && a.t <= i.end);
    if (!under && a.phase !== 'data-end') {
      v.push({
        invariant: 3,
        message: `pid ${a.pid} on ${a.host} wrote volume ${k} (${a.phase}) without holding its exclusive lease`,
        t: a.t,
        about: [a.volume, String(a.pid)],
      });
    }
    if (a.phase === 'data-start') open.set(`${a.pid}:${k}`, a);
    if (a.phase === 'data-end') {
      const s = open.get(`${a.pid}:${k}`);
      open.delete(`${a.pid}:${k}`);
      if (s) addWrite(k, { pid: a.pid, start: s.t, end: a.t, surelyUntil: a.t, what: `data write of pid ${a.pid} on ${a.host}` });
    }
  }
  for (const [pk, s] of open)
    addWrite(pk.slice(pk.indexOf(':') + 1), { pid: s.pid, start: s.t, ...ends(s.pid), what: `data write of pid ${s.pid} on ${s.host} (no end: it died)` });
  for (const h of history) {
    if (h.kind !== 'guest-write') continue;
    const k = key(h.domain, h.volume, h.leaseOffset);
    const guest = { pid: h.pid, start: h.start, end: h.end, surelyUntil: h.end, what: `guest write of client ${h.client} (pattern ${h.pattern})` };
    addWrite(k, guest);
    // A guest writes a volume no operation is working on: nobody else may hold its exclusive lease meanwhile.
    for (const l of leases.get(k) ?? []) {
      if (l.start < guest.surelyUntil && guest.start < l.surelyUntil) {
        v.push({ invariant: 3, message: `${guest.what} on ${k} while ${l.what} was held`, t: guest.start, about: [h.volume, h.disk] });
      }
    }
  }
  for (const [k, list] of writes) v.push(...overlaps(k, list, 'two writers'));

  // Generations: no write under a generation older than one another writer already committed to
  // the same incarnation of the volume (its creation time tells a re-created volume id apart).
  const byVolume = new Map<string, Array<AuditLine & { kind: 'write' }>>();
  for (const a of audit) {
    if (a.kind !== 'write') continue;
    const k = `${key(a.domain, a.volume, a.leaseOffset)}#${a.incarnation ?? '?'}`;
    byVolume.set(k, [...(byVolume.get(k) ?? []), a]);
  }
  for (const [k, list] of byVolume) {
    const committed: Array<{ pid: number; generation: number }> = [];
    for (const a of list) {
      if (a.generation >= 0) {
        const newer = committed.find((c) => c.pid !== a.pid && c.generation > a.generation);
        if (newer) {
          v.push({
            invariant: 3,
            message: `pid ${a.pid} wrote volume ${k} under generation ${a.generation} after pid ${newer.pid} had committed generation ${newer.generation}`,
            t: a.t,
            about: [a.volume, String(a.pid)],
          });
        }
      }
      if (a.phase === 'record' && a.legality === 'LEGAL' && a.recordGeneration !== undefined) committed.push({ pid: a.pid, generation: a.recordGeneration });
    }
  }
  return v;
}

/** Pairs of intervals of different pids that surely overlapped (each started before the other surely ended). */
function overlaps(k: string, list: Interval[], what: string): Violation[] {
  const v: Violation[] = [];
  const sorted = [...list].sort((a, b) => a.start - b.start);
  for (let i = 0; i < sorted.length; i++) {
    for (let j = i + 1; j < sorted.length; j++) {
      const a = sorted[i]!;
      const b = sorted[j]!;
      if (b.start >= a.end) break;
      if (a.pid !== b.pid && b.start < a.surelyUntil) {
        v.push({
          invariant: 3,
          message: `${what} on ${k}: ${a.what} and ${b.what} overlap`,
          t: b.start,
          about: [k.split('/')[1]!, String(a.pid), String(b.pid)],
        });
      }
    }
  }
  return v;
}

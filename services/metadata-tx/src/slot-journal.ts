/**
 * The slot journal of a domain (dom_md/slot-journal): what each of the last few holds of the
 * domain metadata lease by a metadata-tx added to the lease slots in use and to the committed
 * volume ids, by lease version (lver). A host whose slot index was true at the end of its own
 * last hold (lver P) and that now holds the lease at lver C brings its index up to date from the
 * entries P+1 .. C-1 instead of scanning every record of the domain, if and only if the journal
 * has an entry for every one of those versions: sanlock bumps the lver on every exclusive acquire
 * by anyone, so a hold that wrote no entry (the GC, a transaction that deletes or fails, a holder
 * that crashed, an older metadata-tx) leaves a gap, and a gap means a full scan.
 *
 * Each entry is written by its holder after the last transaction of its hold ended and before
 * the release (under the lease: no two writers), only when every transaction of the hold kept
 * the slot index (creates, updates), so it lists everything the hold added; nothing else in such
 * a hold removes a slot or a committed id. The file is written whole (temp file + rename) with
 * a checksum and no fsync: a journal lost, torn, or older after a crash fails the checksum or
 * lacks the entries, which again only costs the scan. It is hostile input like any file of the
 * domain: bounded, parsed strictly, and anything unexpected is ignored (a scan instead).
 * Assumes what format-domain guarantees: a domain's SDM lease area is written once, so its lver
 * only grows.
 */
import { createHash } from 'node:crypto';
import path from 'node:path';
import { ConfinedRoot, DomainLayout, validateId } from '@sdmesh/common';

/** What one hold added (lver: its lease version). */
export interface JournalEntry {
  lver: number;
  slots: number[];
  /** [volume id, image id] of each volume the hold committed. */
  volumes: [string, string][];
}

export const SLOT_JOURNAL_NAME = 'slot-journal';
/** Entries kept: a host more holds behind than this scans. */
const KEPT_ENTRIES = 8;
/** Far above 8 full holds (256 creates each); a larger file is not read. */
const MAX_JOURNAL_BYTES = 2 * 1024 * 1024;

const journalPath = (root: string) => path.join(new DomainLayout(root).domMdDir, SLOT_JOURNAL_NAME);
const checksum = (body: string) => createHash('sha256').update(body).digest('hex');

function validEntry(e: unknown): e is JournalEntry {
  if (typeof e !== 'object' || e === null) return false;
  const { lver, slots, volumes } = e as Record<string, unknown>;
  if (!Number.isSafeInteger(lver) || (lver as number) <= 0) return false;
  if (!Array.isArray(slots) || !slots.every((s) => Number.isSafeInteger(s) && s >= 0)) return false;
  if (!Array.isArray(volumes)) return false;
  try {
    for (const v of volumes) {
      if (!Array.isArray(v) || v.length !== 2) return false;
      validateId('volume id', v[0] as string);
      validateId('image id', v[1] as string);
    }
  } catch {
    return false;
  }
  return true;
}

/** The journal's entries ([] when absent, unreadable, of another domain or not intact). */
export async function readSlotJournal(root: string, domainId: string): Promise<JournalEntry[]> {
  try {
    const raw = await new ConfinedRoot(root).readSmallFile(journalPath(root), MAX_JOURNAL_BYTES);
    if (raw.length > MAX_JOURNAL_BYTES) return [];
    const file = JSON.parse(raw.toString('utf8')) as { body?: unknown; sha256?: unknown };
    if (typeof file.body !== 'string' || file.sha256 !== checksum(file.body)) return [];
    const body = JSON.parse(file.body) as { domainId?: unknown; holds?: unknown };
    if (body.domainId !== domainId || !Array.isArray(body.holds) || !body.holds.every(validEntry)) return [];
    return body.holds;
  } catch {
    return [];
  }
}

/**
 * The entries of lvers from..to (inclusive) in order, or undefined if any is missing (or listed
 * twice, which only a damaged file has).
 */
export function entriesBetween(entries: readonly JournalEntry[], from: number, to: number): JournalEntry[] | undefined {
  const out: JournalEntry[] = [];
  for (let lver = from; lver <= to; lver++) {
    const found = entries.filter((e) => e.lver === lver);
    if (found.length !== 1) return undefined;
    out.push(found[0]!);
  }
  return out;
}

/** Adds this hold's entry (call under the domain lease, after the hold's last transaction ended). */
export async function appendSlotJournal(root: string, domainId: string, entry: JournalEntry): Promise<void> {
  const dom = new ConfinedRoot(root);
  const file = journalPath(root);
  // Entries of older versions only (a later one could only be left from before a crash of this very hold's version).
  const kept = (await readSlotJournal(root, domainId)).filter((e) => e.lver < entry.lver).slice(-(KEPT_ENTRIES - 1));
  const body = JSON.stringify({ domainId, holds: [...kept, entry] });
  const temp = `${file}.tmp`;
  // Only the lease holder writes here: a temp file left by a crash is its own, from an earlier hold.
  await dom.unlink(temp).catch(() => undefined);
  const handle = await dom.createFile(temp, 'record');
  try {
    await handle.writeFile(JSON.stringify({ body, sha256: checksum(body) }));
  } finally {
    await handle.close();
  }
  await dom.rename(temp, file);
}

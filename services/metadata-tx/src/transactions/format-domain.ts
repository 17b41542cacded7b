/**
 * FormatDomain: makes a directory a storage domain. Steps: check the target (absent, empty, or
 * the leftovers of an interrupted format) → dom_md/ and images/ → the lockspace and reserved
 * leases → commit: link(2) dom_md/metadata (fails if another formatter committed first).
 * The same domain id again is a retry and returns the domain.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import {
  alreadyExists,
  ConfinedRoot,
  DEFAULT_IO_TIMEOUT_SECONDS,
  DEFAULT_MAX_VOLUMES,
  DomainLayout,
  encodeDomainMetadata,
  failedPrecondition,
  FIRST_VOLUME_SLOT,
  GrpcStatus,
  invalidArgument,
  ioError,
  LEASE_SLOT_SIZE,
  MAX_MAX_VOLUMES,
  pb,
  readDomainMetadata,
  Reason,
  SdmeshError,
  TX_INFIX,
  validateDomainName,
  validateDomainPath,
  validateId,
  type DomainMetadata,
} from '@sdmesh/common';
import { exists, type TransactionCore, type TransactionKind } from './core';
import { describeDomain } from './queries';

const MAX_IO_TIMEOUT_SECONDS = 60;

export interface FormatDomainParams {
  root: string;
  domainId: string;
  name: string;
  maxVolumes: number;
  ioTimeoutSeconds: number;
}

function formatDomainParams(req: pb.FormatDomainRequest): FormatDomainParams {
  const root = validateDomainPath(req.path);
  const domainId = validateId('domain id', req.domainId);
  const name = validateDomainName(req.name);
  const maxVolumes = req.maxVolumes || DEFAULT_MAX_VOLUMES;
  if (!Number.isInteger(maxVolumes) || maxVolumes < 1 || maxVolumes > MAX_MAX_VOLUMES) {
    throw invalidArgument(`max_volumes ${maxVolumes} is out of range 1..${MAX_MAX_VOLUMES}`, Reason.INVALID_MAX_VOLUMES);
  }
  const ioTimeoutSeconds = req.ioTimeoutSeconds || DEFAULT_IO_TIMEOUT_SECONDS;
  if (!Number.isInteger(ioTimeoutSeconds) || ioTimeoutSeconds < 1 || ioTimeoutSeconds > MAX_IO_TIMEOUT_SECONDS) {
    throw invalidArgument(`io_timeout_seconds ${ioTimeoutSeconds} is out of range 1..${MAX_IO_TIMEOUT_SECONDS}`, Reason.INVALID_IO_TIMEOUT);
  }
  return { root, domainId, name, maxVolumes, ioTimeoutSeconds };
}

async function formatDomain(tx: TransactionCore, p: FormatDomainParams): Promise<pb.StorageDomain> {
  const { root, domainId } = p;
  // An existing domain: the same one again is a retry (idempotent), anything else is refused.
  const existing = await readDomainMetadata(root).catch((err: unknown) => SdmeshError.from(err));
  if (!(existing instanceof SdmeshError)) {
    if (existing.domainId === domainId) return describeDomain(tx, root);
    throw alreadyExists(`${root} is already storage domain ${existing.domainId} (AttachStorageDomain adopts it)`, Reason.DOMAIN_EXISTS);
  }
  if (existing.code !== GrpcStatus.NOT_FOUND) {
    throw failedPrecondition(`${root} has unreadable domain metadata (${existing.message}); refusing to format over it`, Reason.DOMAIN_NOT_EMPTY);
  }
  await checkFormatTarget(root);
  // A new domain under an id this process may have written before (a lab re-format): no old slot index.
  tx.slotIndexes.forget(domainId);

  const dom = await makeDomainDirectories(tx, root);
  await tx.opts.leases.formatDomainLeases({ id: domainId, path: root }, p.ioTimeoutSeconds);
  tx.fault('format.after-leases');
  await commitDomainMetadata(tx, dom, p);
  tx.fault('format.after-metadata');

  const domain = await describeDomain(tx, root);
  tx.publish({ $case: 'domain', domain: { kind: pb.DomainEvent_Kind.KIND_FORMATTED, domain } });
  tx.opts.log?.info({ domainId, path: root }, 'storage domain formatted');
  return domain;
}

/** The domain directory, dom_md/ and images/ (those that exist are kept), durable. */
async function makeDomainDirectories(tx: TransactionCore, root: string): Promise<ConfinedRoot> {
  const layout = new DomainLayout(root);
  await fs.mkdir(root, { recursive: true, mode: 0o770 });
  const dom = new ConfinedRoot(root);
  await dom.setDirectoryOwnership(root);
  if (!(await exists(dom, layout.domMdDir, 'directory'))) await dom.mkdir(layout.domMdDir);
  if (!(await exists(dom, layout.imagesDir, 'directory'))) await dom.mkdir(layout.imagesDir);
  await dom.fsyncDir(root);
  await new ConfinedRoot(path.dirname(root)).fsyncDir(path.dirname(root));
  tx.fault('format.after-dirs');
  return dom;
}

/**
 * Commit: link(2) the temp file to dom_md/metadata. It fails if another formatter committed
 * first, so at most one format of a directory ever wins.
 */
async function commitDomainMetadata(tx: TransactionCore, dom: ConfinedRoot, p: FormatDomainParams): Promise<void> {
  const layout = new DomainLayout(p.root);
  const md: DomainMetadata = {
    domainId: p.domainId,
    name: p.name,
    ctimeMs: Date.now(),
    maxVolumes: p.maxVolumes,
    ioTimeoutSeconds: p.ioTimeoutSeconds,
    leaseSlotSize: LEASE_SLOT_SIZE,
    firstVolumeSlot: FIRST_VOLUME_SLOT,
  };
  await dom
    .writeFileAtomic(layout.metadataPath, encodeDomainMetadata(md), {
      tempSuffix: TX_INFIX + tx.newTxId(),
      noReplace: true,
      beforeCommit: () => tx.fault('format.before-commit'),
    })
    .catch((err: unknown) => {
      const e = ioError(err, `domain metadata ${layout.metadataPath}`);
      throw e.code === GrpcStatus.ALREADY_EXISTS ? alreadyExists(`${p.root} was formatted concurrently by another request`, Reason.DOMAIN_EXISTS) : e;
    });
}

/** A format target must be absent, empty, or the leftovers of an interrupted format. */
async function checkFormatTarget(root: string): Promise<void> {
  const dom = new ConfinedRoot(root);
  let entries: string[];
  try {
    const listing = await dom.list(root, ['file', 'directory', 'symlink', 'fifo', 'socket', 'block-device', 'char-device', 'unknown']);
    entries = listing.entries.map((e) => e.name);
  } catch (err) {
    const e = ioError(err, `domain directory ${root}`);
    if (e.code === GrpcStatus.NOT_FOUND) return;
    throw e;
  }
  const layout = new DomainLayout(root);
  const refuse = (what: string) => failedPrecondition(`${root} is not empty (${what}); refusing to format it`, Reason.DOMAIN_NOT_EMPTY);
  for (const entry of entries) {
    if (entry === 'lost+found') continue; // the root of a freshly made file system
    if (entry === 'images') {
      if (!(await exists(dom, layout.imagesDir, 'directory'))) throw refuse('images is not a directory');
      if ((await dom.list(layout.imagesDir, [])).skipped.length > 0) throw refuse('images/ has entries');
    } else if (entry === 'dom_md') {
      if (!(await exists(dom, layout.domMdDir, 'directory'))) throw refuse('dom_md is not a directory');
      const listing = await dom.list(layout.domMdDir, ['file']);
      const leftovers = [
        ...listing.entries.map((e) => e.name).filter((n) => n !== 'ids' && n !== 'leases' && !n.startsWith('metadata' + TX_INFIX)),
        ...listing.skipped.map((x) => `${x.name} (${x.type})`),
      ];
      if (leftovers.length > 0) throw refuse(`dom_md/ has ${leftovers.join(', ')}`);
    } else {
      throw refuse(`found ${entry}`);
    }
  }
}

export const formatDomainTransaction: TransactionKind<pb.FormatDomainRequest, FormatDomainParams, pb.StorageDomain> = {
  op: 'format',
  params: formatDomainParams,
  run: formatDomain,
};

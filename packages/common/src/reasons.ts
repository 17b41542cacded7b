import { status } from '@grpc/grpc-js';
import { SdmeshError } from './errors';

/**
 * Every reason sdmesh puts on an error, declared once: its gRPC status code and what it means
 * for a client (docs/api-errors.md is generated from this table: `npm run docs:errors`).
 * Errors carry the reason in the `sdmesh-reason` trailer; programs match on it (see the
 * predicates below), people read the message.
 */
export const REASONS = {
  ABORTED: { code: status.ABORTED, doc: 'The operation was aborted (by a caller or a shutdown); nothing of it is visible.' },
  ACQUIRE_FAILED: {
    code: status.FAILED_PRECONDITION,
    doc: "sanlock refused to acquire a lease for a reason other than contention; the message has sanlock's error.",
  },
  ALREADY_EXISTS: { code: status.ALREADY_EXISTS, doc: 'The entity already exists.' },
  ATTACHED_TO_ANOTHER_HOST: {
    code: status.FAILED_PRECONDITION,
    doc: 'The disk is published to another host in a way that excludes this one (either attachment is exclusive); the message names the host.',
  },
  ATTACHMENT_MISMATCH: { code: status.ALREADY_EXISTS, doc: 'The disk is already published to this host with another mode or readonly flag.' },
  ATTACHMENT_RECORD_INVALID: {
    code: status.INTERNAL,
    doc: "The scheduler's stored attachment record of the disk is unreadable (damaged, or not written by sdmesh): nothing changes for that disk until an operator repairs or removes it; the message names the KV key.",
  },
  BITMAP_EXISTS: { code: status.ALREADY_EXISTS, doc: 'A dirty bitmap of this name already exists on a volume of the disk.' },
  BITMAP_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No volume of the disk has a dirty bitmap of this name.' },
  BROKEN_CHAIN: { code: status.FAILED_PRECONDITION, doc: "A volume's parent named in its record is missing or unreadable: the chain can't be opened." },
  CANCELLED: { code: status.CANCELLED, doc: 'The call or operation was cancelled by its caller.' },
  CHECKSUM_FAILED: { code: status.FAILED_PRECONDITION, doc: 'A checksum of a volume could not be computed (qemu-img failed on it).' },
  CONCURRENT_REQUEST: { code: status.ABORTED, doc: 'Another request with the same request id is being submitted right now; retry it.' },
  COPY_FAILED: { code: status.INTERNAL, doc: 'A copy job failed without a reason of its own; the message has what the data-mover reported.' },
  DEADLINE_EXCEEDED: { code: status.DEADLINE_EXCEEDED, doc: 'The deadline passed before the call finished.' },
  DESTINATION_BUSY: { code: status.ABORTED, doc: 'The destination volume of a copy is being written by another job.' },
  DESTINATION_CHAIN_MISMATCH: {
    code: status.FAILED_PRECONDITION,
    doc: "The destination's backing chain does not match the source's, so the chain can't be kept.",
  },
  DESTINATION_HAS_CHILDREN: { code: status.FAILED_PRECONDITION, doc: "The destination volume has snapshots on top: it can't be overwritten." },
  DESTINATION_TOO_SMALL: { code: status.FAILED_PRECONDITION, doc: 'The destination volume is smaller than the source.' },
  DIRECT_IO_UNSUPPORTED: {
    code: status.FAILED_PRECONDITION,
    doc: "The storage's file system refuses O_DIRECT: sdmesh writes volume data only bypassing the host's page cache (so no write lands after the writer's lease is freed), so the job is refused.",
  },
  DISK_EXISTS_IN_TARGET: { code: status.ALREADY_EXISTS, doc: 'The target domain already has a disk with this id.' },
  DISK_HAS_SNAPSHOTS: {
    code: status.FAILED_PRECONDITION,
    doc: 'An upload replaces the guest data of a one-volume disk only: this disk has snapshots (delete them, or copy it with collapse first).',
  },
  DISK_ILLEGAL: { code: status.FAILED_PRECONDITION, doc: 'The disk has an ILLEGAL volume (an unfinished or failed data operation).' },
  DISK_IS_CLONE: {
    code: status.FAILED_PRECONDITION,
    doc: "The disk is a thin clone (its base is an overlay on a template): it can't become a template, and it is moved or copied only flattened (copy with collapse).",
  },
  DISK_IS_TEMPLATE: {
    code: status.FAILED_PRECONDITION,
    doc: 'The disk is a template, read-only for good: no snapshot, write, extend or move; clone it instead.',
  },
  DISK_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No disk with this id in that storage domain.' },
  DISK_PUBLISHED: { code: status.FAILED_PRECONDITION, doc: 'The disk is published to a host: unpublish it first.' },
  DOMAIN_ALREADY_ACTIVE: { code: status.FAILED_PRECONDITION, doc: 'The storage domain is active already (nothing to activate).' },
  DOMAIN_AREA_MISSING: { code: status.FAILED_PRECONDITION, doc: "The domain's dom_md directory does not exist yet." },
  DOMAIN_CONTAINS_DOMAIN: { code: status.INVALID_ARGUMENT, doc: 'The path holds an existing storage domain below it.' },
  DOMAIN_EXISTS: { code: status.ALREADY_EXISTS, doc: 'The directory already is a storage domain (another id).' },
  DOMAIN_ID_IN_USE: {
    code: status.ALREADY_EXISTS,
    doc: 'A registered storage domain already has the id read from this directory (attached twice, or a copy of a domain).',
  },
  DOMAIN_INSIDE_DOMAIN: { code: status.INVALID_ARGUMENT, doc: 'The path lies inside an existing storage domain.' },
  DOMAIN_IN_MAINTENANCE: {
    code: status.FAILED_PRECONDITION,
    doc: 'The storage domain is deactivated (maintenance): no operations run on it until it is activated.',
  },
  DOMAIN_IS_STORAGE_ROOT: { code: status.INVALID_ARGUMENT, doc: 'A storage root itself can not be a domain: a domain is a directory beneath a root.' },
  DOMAIN_NOT_ACTIVE: { code: status.FAILED_PRECONDITION, doc: 'The storage domain is being created or removed.' },
  DOMAIN_NOT_EMPTY: { code: status.FAILED_PRECONDITION, doc: 'The directory holds files that are not an sdmesh domain, or the domain still has disks.' },
  DOMAIN_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No storage domain with this id (or at this path).' },
  DOMAIN_OUTSIDE_STORAGE_ROOTS: { code: status.PERMISSION_DENIED, doc: 'The domain path is not beneath one of the configured storage roots.' },
  DOMAIN_PATH_IN_USE: { code: status.ALREADY_EXISTS, doc: 'A registered storage domain already uses this path.' },
  DOMAIN_PATH_NOT_EMPTY: { code: status.INVALID_ARGUMENT, doc: 'The directory for a new domain is not empty.' },
  DOMAIN_UNREADABLE: {
    code: status.FAILED_PRECONDITION,
    doc: "The directory's domain metadata can't be used (torn, foreign, corrupt, unknown format version, unreachable, or another domain's): it can't be attached or activated.",
  },
  FAILED_PRECONDITION: { code: status.FAILED_PRECONDITION, doc: 'The system is not in a state that allows the call.' },
  FENCE_PENDING: {
    code: status.FAILED_PRECONDITION,
    doc: "A dead host's shared attachment was removed while other hosts used the disk, so the disk's generation must be bumped before it is published with no other host on it, and its leaf is still leased by a host or job without an attachment: retry once the lease is free.",
  },
  FENCE_TIMEOUT: { code: status.ABORTED, doc: "A dead host's lease on the destination did not expire in time, so the copy could not be fenced and retried." },
  FILE_CHANGED: { code: status.ABORTED, doc: 'A file changed while it was being read (size or identity): the result would not be consistent.' },
  FORMAT_MISMATCH: { code: status.FAILED_PRECONDITION, doc: "The file's format is not the one the record or the request says." },
  GENERATION_MISMATCH: {
    code: status.FAILED_PRECONDITION,
    doc: "The volume's generation is not the one the caller expected: a newer writer (or a fence) came first.",
  },
  HARD_LINK_REFUSED: {
    code: status.FAILED_PRECONDITION,
    doc: 'A volume file or record has more than one hard link: it may be shared with something outside the domain.',
  },
  HOLDER_NOT_REGISTERED: { code: status.FAILED_PRECONDITION, doc: "The lease holder process is not registered with this host's sanlock daemon." },
  HOLDER_NOT_RUNNING: { code: status.FAILED_PRECONDITION, doc: 'The lease holder process is not running.' },
  HOST_ALREADY_ACTIVE: { code: status.FAILED_PRECONDITION, doc: 'The host is not in maintenance (nothing to activate).' },
  HOST_CANNOT_REACH_DOMAIN: { code: status.FAILED_PRECONDITION, doc: "The named host has not joined the domain's lockspace." },
  HOST_ID_IN_USE: { code: status.ALREADY_EXISTS, doc: 'Another host already has this host id.' },
  HOST_ID_MISMATCH: { code: status.FAILED_PRECONDITION, doc: "The host already has another host id (in this lockspace or in the scheduler's table)." },
  HOST_IN_MAINTENANCE: { code: status.FAILED_PRECONDITION, doc: 'The host is in maintenance: no step is placed on it until it is activated.' },
  HOST_NOT_DEAD: {
    code: status.FAILED_PRECONDITION,
    doc: "The host does not answer but sanlock does not call it dead in the disk's domain yet: its attachment stays until then (what it runs may still hold the disk's leases).",
  },
  HOST_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No host with this name.' },
  HOST_UNAVAILABLE: { code: status.UNAVAILABLE, doc: "The host's services did not answer." },
  HOST_UNKNOWN: { code: status.UNAVAILABLE, doc: 'The step names a host the scheduler does not know (any more).' },
  IMAGE_ENCRYPTED: { code: status.FAILED_PRECONDITION, doc: 'The qcow2 image is encrypted: sdmesh does not handle encrypted images.' },
  IMAGE_EXISTS: { code: status.ALREADY_EXISTS, doc: 'An image with this id already exists in the domain.' },
  IMAGE_HAS_DATA_FILE: { code: status.FAILED_PRECONDITION, doc: 'The qcow2 image names an external data file: refused (it could point anywhere).' },
  IMAGE_LARGER_THAN_DISK: { code: status.INVALID_ARGUMENT, doc: 'The image to upload is larger than the disk: extend the disk first.' },
  IMAGE_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No image with this id in the domain.' },
  IMPORT_DISABLED: { code: status.FAILED_PRECONDITION, doc: 'This host names no import directories, so ImportDisk is off.' },
  INSUFFICIENT_SPACE: { code: status.RESOURCE_EXHAUSTED, doc: "The domain's free space is below its critical reserve: new allocations are blocked." },
  INTERNAL: { code: status.INTERNAL, doc: 'An unexpected error; the message and the service log have the details.' },
  INVALID_ALLOCATION: { code: status.INVALID_ARGUMENT, doc: 'Unknown allocation policy.' },
  INVALID_ARGUMENT: { code: status.INVALID_ARGUMENT, doc: 'A request field is invalid; the message names it.' },
  INVALID_ATTACHMENT_MODE: { code: status.INVALID_ARGUMENT, doc: 'The attachment mode is not EXCLUSIVE or SHARED.' },
  INVALID_BITMAP_NAME: {
    code: status.INVALID_ARGUMENT,
    doc: 'A bitmap name must be 1..128 characters of letters, digits and . _ : -, starting with a letter or digit.',
  },
  INVALID_CAPACITY: { code: status.INVALID_ARGUMENT, doc: 'The capacity is zero, not a multiple of 512 bytes, or too large.' },
  INVALID_CLONE_MODE: { code: status.INVALID_ARGUMENT, doc: 'Unknown clone mode (THIN or FULL).' },
  INVALID_COMPAT: { code: status.INVALID_ARGUMENT, doc: 'The qcow2 compat level to amend to is not supported (only an upgrade to 1.1 is).' },
  INVALID_DISK_ID: { code: status.INVALID_ARGUMENT, doc: 'The disk id is not a UUID.' },
  INVALID_DOMAIN_ID: { code: status.INVALID_ARGUMENT, doc: 'The storage domain id is not a UUID.' },
  INVALID_FILTER: { code: status.INVALID_ARGUMENT, doc: 'The list filter is not one the API understands.' },
  INVALID_FORMAT: { code: status.INVALID_ARGUMENT, doc: 'Unknown volume format.' },
  INVALID_GENERATION: { code: status.INVALID_ARGUMENT, doc: 'The generation is not a non-negative integer.' },
  INVALID_HOST: { code: status.INVALID_ARGUMENT, doc: 'The host name or its announced addresses are invalid.' },
  INVALID_HOST_ID: { code: status.INVALID_ARGUMENT, doc: 'The host id is outside 1..250 (lease areas are formatted for 250 hosts).' },
  INVALID_ID: { code: status.INVALID_ARGUMENT, doc: 'An id is not a UUID.' },
  INVALID_IO_TIMEOUT: { code: status.INVALID_ARGUMENT, doc: 'The sanlock io_timeout is out of range.' },
  INVALID_JOB_ID: { code: status.INVALID_ARGUMENT, doc: 'The job id is not a UUID.' },
  INVALID_LEGALITY: { code: status.INVALID_ARGUMENT, doc: 'Unknown legality value.' },
  INVALID_MAX_VOLUMES: { code: status.INVALID_ARGUMENT, doc: 'max_volumes is out of range.' },
  INVALID_OPERATION_NAME: { code: status.INVALID_ARGUMENT, doc: 'The operation name is not operations/<uuid>.' },
  INVALID_PAGE_SIZE: { code: status.INVALID_ARGUMENT, doc: 'page_size is negative or not an integer.' },
  INVALID_PAGE_TOKEN: { code: status.INVALID_ARGUMENT, doc: 'The page token was not returned by this API.' },
  INVALID_PATH: { code: status.INVALID_ARGUMENT, doc: 'A path is not absolute, not normalized, or too long.' },
  INVALID_RATE_LIMIT: { code: status.INVALID_ARGUMENT, doc: 'The rate limit is negative.' },
  INVALID_REQUEST_ID: { code: status.INVALID_ARGUMENT, doc: 'The request id is empty or too long.' },
  INVALID_SOURCE_PATH: { code: status.INVALID_ARGUMENT, doc: 'The import source path is not absolute or normalized.' },
  INVALID_TEXT: { code: status.INVALID_ARGUMENT, doc: 'A name or description is empty or holds control characters.' },
  INVALID_THRESHOLD: { code: status.INVALID_ARGUMENT, doc: 'A free-space threshold is out of range.' },
  INVALID_TIMEOUT: { code: status.INVALID_ARGUMENT, doc: 'A timeout is out of range.' },
  INVALID_TRANSFER_DIRECTION: { code: status.INVALID_ARGUMENT, doc: 'An image transfer is an UPLOAD or a DOWNLOAD.' },
  JOB_ID_CONFLICT: { code: status.ALREADY_EXISTS, doc: 'A different job already uses this job id.' },
  JOB_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No job with this id on this data-mover.' },
  JOB_STREAM_ENDED: { code: status.UNAVAILABLE, doc: "The job's watch stream ended before the job did." },
  JOIN_FAILED: { code: status.FAILED_PRECONDITION, doc: 'sanlock could not join the lockspace; the message has its error.' },
  LEASE_ALREADY_HELD: { code: status.ABORTED, doc: 'This process already holds the lease (sanlock lets a process hold a resource once).' },
  LEASE_AREA_INVALID: { code: status.FAILED_PRECONDITION, doc: 'No valid lease was formatted at that offset.' },
  LEASE_AREA_IN_USE: { code: status.FAILED_PRECONDITION, doc: 'The lease area to format is held, by this host or by a live host according to sanlock.' },
  LEASE_HELD: { code: status.ABORTED, doc: 'The lease is held by another host or process; the message names the holder.' },
  LEASE_HELD_ON_THIS_HOST: { code: status.ABORTED, doc: 'The lease is held by another operation of this host.' },
  LEASE_LOST: { code: status.ABORTED, doc: 'The host lost the lockspace, so sanlock fenced the job holding the lease.' },
  LEASE_MODE_CONFLICT: {
    code: status.INTERNAL,
    doc: 'One operation asked for the same lease in two modes (shared and exclusive): a bug, refused before any lease was taken.',
  },
  LEASE_NOT_HELD: { code: status.FAILED_PRECONDITION, doc: 'The caller does not hold that lease.' },
  LEASE_WAIT_TIMEOUT: { code: status.ABORTED, doc: 'The lease did not become free within the wait.' },
  LEAVE_FAILED: { code: status.FAILED_PRECONDITION, doc: 'sanlock could not leave the lockspace.' },
  LEAVE_INCOMPLETE: {
    code: status.UNAVAILABLE,
    doc: "Some hosts' lease-managers could not be made to leave the lockspace (named in the message); the domain or host stays flagged and hosts leave when they answer; retry.",
  },
  LOCKED: { code: status.ABORTED, doc: 'The entity is locked by another operation; the message names it.' },
  LOCKSPACE_FILE_MISSING: { code: status.FAILED_PRECONDITION, doc: 'The lockspace (ids) file of the domain does not exist.' },
  LOCKSPACE_IN_USE: {
    code: status.FAILED_PRECONDITION,
    doc: 'The lockspace is joined or belongs to a formatted domain: formatting it would destroy live delta leases.',
  },
  LOCKSPACE_LEFT: {
    code: status.FAILED_PRECONDITION,
    doc: "This host left the lockspace on the scheduler's order (domain deactivated or removed, host in maintenance); only a newer order joins it again.",
  },
  LOCKSPACE_NOT_JOINED: { code: status.FAILED_PRECONDITION, doc: 'This host has not joined the lockspace.' },
  LOCK_CONTENTION: { code: status.ABORTED, doc: 'Engine locks changed under the request too often; retry.' },
  MALFORMED_REQUEST: { code: status.INVALID_ARGUMENT, doc: "The request could not be decoded as the method's message." },
  MERGE_INCOMPLETE: {
    code: status.FAILED_PRECONDITION,
    doc: "A merge's finalize found its target ILLEGAL or at another generation than the data merge left: the data merge has to run (again) first.",
  },
  MERGE_INTO_TEMPLATE: {
    code: status.FAILED_PRECONDITION,
    doc: "The volume's parent is a template's volume (read-only for good): a thin clone's base can't be merged into it.",
  },
  MERGE_NOT_NEIGHBOURS: {
    code: status.FAILED_PRECONDITION,
    doc: "A merge's destination must be the source's parent, or (when the source is a base) its only child.",
  },
  MISSING_ROLE: { code: status.PERMISSION_DENIED, doc: "The user's role (from the roles file) does not allow this method; the message names the role needed." },
  NOT_A_DOMAIN_AREA: { code: status.PERMISSION_DENIED, doc: "Only a storage domain's dom_md/ids or dom_md/leases, reached without links, can be formatted." },
  NOT_A_TEMPLATE: { code: status.FAILED_PRECONDITION, doc: 'The source of a clone is not a template: mark it a template first.' },
  NOT_A_TRANSFER: { code: status.FAILED_PRECONDITION, doc: 'The operation named is not an image transfer.' },
  NOT_FOUND: { code: status.NOT_FOUND, doc: 'The entity does not exist.' },
  NOT_HOLDER: { code: status.PERMISSION_DENIED, doc: 'The named holder pid is neither the caller nor a child of it.' },
  NOT_LOCAL: { code: status.PERMISSION_DENIED, doc: "The method is served only to this host's processes on the lease-manager's unix socket." },
  NOT_TRANSFER_OWNER: {
    code: status.PERMISSION_DENIED,
    doc: 'Only the user who started an image transfer, or an admin, may finalize or cancel it.',
  },
  NOT_QCOW2: { code: status.FAILED_PRECONDITION, doc: 'The operation needs qcow2 volumes (dirty bitmaps, amend) and the disk or volume is raw.' },
  NO_CLIENT_CERTIFICATE: { code: status.UNAUTHENTICATED, doc: 'No client certificate signed by the sdmesh CA (none, untrusted or expired).' },
  NO_FREE_HOST_ID: { code: status.FAILED_PRECONDITION, doc: 'All host ids 1..250 are in use.' },
  NO_FREE_LEASE_SLOT: { code: status.RESOURCE_EXHAUSTED, doc: 'The domain has no free volume lease slot (max_volumes reached).' },
  NO_HOST: { code: status.UNAVAILABLE, doc: 'No healthy host can run the step (within the placement wait).' },
  NO_LEASE_MANAGER: { code: status.FAILED_PRECONDITION, doc: "The service runs without a lease-manager, so it can't take leases." },
  NO_SPACE: { code: status.RESOURCE_EXHAUSTED, doc: 'The file system is full.' },
  NO_SPM: { code: status.UNAVAILABLE, doc: 'SPM mode: no host holds the SPM lease yet.' },
  NO_STORAGE_ROOTS: { code: status.PERMISSION_DENIED, doc: 'The service is configured with no storage roots (--storage-roots), so it uses no domain.' },
  ONLY_VOLUME: { code: status.FAILED_PRECONDITION, doc: 'The disk has one volume: there is no snapshot to delete (delete the disk instead).' },
  OPERATION_CANCELLED: { code: status.CANCELLED, doc: 'The operation was cancelled (CancelOperation).' },
  OPERATION_FENCED: {
    code: status.ABORTED,
    doc: 'The operation was aborted and its rollback fenced it in the domain (FenceOperation): this late request of it commits nothing.',
  },
  OPERATION_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No operation with this name.' },
  OPERATION_PURGED: {
    code: status.NOT_FOUND,
    doc: 'The operation ended longer ago than the operation retention (--operation-retention-ms) and its record was purged; the message says how it ended.',
  },
  OUTSIDE_DOMAIN: { code: status.FAILED_PRECONDITION, doc: 'A path under the domain leads outside it (a link, a mount point): refused.' },
  PARENT_ILLEGAL: { code: status.FAILED_PRECONDITION, doc: 'The parent volume is ILLEGAL.' },
  PARENT_NOT_FOUND: { code: status.NOT_FOUND, doc: 'The parent volume does not exist.' },
  PARENT_NOT_LEAF: { code: status.FAILED_PRECONDITION, doc: 'The parent volume already has a child (only the leaf can be snapshotted).' },
  PATH_OUTSIDE_DOMAIN: { code: status.INVALID_ARGUMENT, doc: "The path given is not below the storage domain's root." },
  PERMISSION_DENIED: { code: status.PERMISSION_DENIED, doc: 'The caller may not do this.' },
  QCOW2_COMPAT_TOO_OLD: {
    code: status.FAILED_PRECONDITION,
    doc: 'The qcow2 volume is compat 0.10, which can not store dirty bitmaps: amend the disk to compat 1.1 first.',
  },
  QEMU_IMG_FAILED: { code: status.INTERNAL, doc: 'qemu-img failed; the message has its last lines.' },
  RELEASE_FAILED: { code: status.FAILED_PRECONDITION, doc: 'sanlock could not release the lease.' },
  REQUEST_ID_EXPIRED: {
    code: status.FAILED_PRECONDITION,
    doc: "The request id belongs to an operation that ended and was purged: its result can't be returned and the request is not run again. Use a new request id to run it again.",
  },
  REQUEST_ID_REUSED: { code: status.ALREADY_EXISTS, doc: 'The request id was used before for a different request.' },
  RESOURCE_EXHAUSTED: { code: status.RESOURCE_EXHAUSTED, doc: 'A resource (space, slots) is exhausted.' },
  SAME_DOMAIN: { code: status.INVALID_ARGUMENT, doc: 'Source and target domain are the same.' },
  SAME_VOLUME: { code: status.INVALID_ARGUMENT, doc: 'Source and destination are the same volume.' },
  SANLOCK_DOWN: { code: status.FAILED_PRECONDITION, doc: "This host's sanlock daemon is not reachable." },
  SANLOCK_ERROR: { code: status.FAILED_PRECONDITION, doc: 'sanlock returned an error; the message has it.' },
  SHRINK_REFUSED: { code: status.INVALID_ARGUMENT, doc: 'ExtendDisk only grows a disk: the new capacity is smaller than the current one.' },
  SHUTTING_DOWN: { code: status.UNAVAILABLE, doc: 'The service is shutting down; retry on another replica or later.' },
  SOURCE_CHANGED: { code: status.FAILED_PRECONDITION, doc: 'The import source is not the file that was inspected (replaced or changed meanwhile).' },
  SOURCE_CONFLICT: { code: status.INVALID_ARGUMENT, doc: 'Give either a source volume or a source file, not both.' },
  SOURCE_EMPTY: { code: status.FAILED_PRECONDITION, doc: 'The import source is empty.' },
  SOURCE_ENCRYPTED: { code: status.FAILED_PRECONDITION, doc: 'The import source is an encrypted image.' },
  SOURCE_HAS_BACKING_FILE: { code: status.FAILED_PRECONDITION, doc: 'The import source names a backing file: import a self-contained image.' },
  SOURCE_HAS_DATA_FILE: { code: status.FAILED_PRECONDITION, doc: 'The import source names an external data file.' },
  SOURCE_ILLEGAL: { code: status.FAILED_PRECONDITION, doc: 'The source volume is ILLEGAL.' },
  SOURCE_IN_STORAGE_DOMAIN: { code: status.FAILED_PRECONDITION, doc: 'The import source lies inside a storage domain: import from an import directory.' },
  SOURCE_NOT_FOUND: { code: status.NOT_FOUND, doc: 'The source (file or volume) does not exist.' },
  SOURCE_NOT_REGULAR_FILE: { code: status.FAILED_PRECONDITION, doc: 'The import source is not a regular file.' },
  SOURCE_OUTSIDE_IMPORT_DIRS: { code: status.FAILED_PRECONDITION, doc: "The import source is not inside one of the host's import directories." },
  SOURCE_TOO_LARGE: { code: status.FAILED_PRECONDITION, doc: 'The import source is larger than the disk can be.' },
  SOURCE_UNREADABLE_IMAGE: { code: status.FAILED_PRECONDITION, doc: "qemu-img can't read the import source as the format it claims." },
  STORAGE_IO_ERROR: { code: status.UNAVAILABLE, doc: 'An I/O error on shared storage.' },
  STORAGE_PERMISSION_DENIED: { code: status.PERMISSION_DENIED, doc: 'The file system refused access to shared storage.' },
  SYMLINK_REFUSED: { code: status.FAILED_PRECONDITION, doc: 'A symbolic link where sdmesh expects a file or directory: refused.' },
  TEMPLATE_HAS_CLONES: { code: status.FAILED_PRECONDITION, doc: 'The template still backs thin clones (the message says how many): delete them first.' },
  TEMPLATE_NOT_SINGLE_VOLUME: { code: status.FAILED_PRECONDITION, doc: 'Only a disk of one volume can become a template: copy it with collapse first.' },
  TEXT_TOO_LONG: { code: status.INVALID_ARGUMENT, doc: 'A name or description is too long.' },
  THIN_CLONE_OTHER_DOMAIN: { code: status.INVALID_ARGUMENT, doc: "A thin clone lives in its template's storage domain; a full clone can go elsewhere." },
  TOO_MANY_ATTEMPTS: { code: status.ABORTED, doc: 'The step was retried too often without success.' },
  TOO_MANY_FENCES: {
    code: status.RESOURCE_EXHAUSTED,
    doc: 'The domain holds as many operation fences as it may (they expire after a day); a rollback that needs one fails until some expire.',
  },
  TRANSFERS_DISABLED: { code: status.FAILED_PRECONDITION, doc: 'This data-mover has no image transfer endpoint configured.' },
  TRANSFER_EXPIRED: { code: status.DEADLINE_EXCEEDED, doc: 'The image transfer reached its maximum duration: it was rolled back.' },
  TRANSFER_FAILED: { code: status.ABORTED, doc: "The transfer's data endpoint failed (its export died, a lease was lost): the transfer was rolled back." },
  TRANSFER_HOST_LOST: { code: status.UNAVAILABLE, doc: 'The host serving the image transfer stopped answering: the transfer was rolled back.' },
  TRANSFER_IDLE: { code: status.DEADLINE_EXCEEDED, doc: 'No request reached the image transfer for longer than its inactivity timeout: it was rolled back.' },
  TRANSFER_NOT_ACTIVE: { code: status.FAILED_PRECONDITION, doc: 'The image transfer is not open (still initializing, or ended): it can not be finalized now.' },
  TRANSFER_NOT_FOUND: { code: status.NOT_FOUND, doc: 'This data-mover has no open transfer with this ticket (never opened here, or forgotten by a restart).' },
  TRANSFER_VERIFY_FAILED: { code: status.FAILED_PRECONDITION, doc: 'The uploaded volume did not pass verification (size, qemu-img check): it stays ILLEGAL.' },
  UNAVAILABLE: { code: status.UNAVAILABLE, doc: 'A service is not reachable right now; retry.' },
  UNEXPECTED_ENTRIES: { code: status.FAILED_PRECONDITION, doc: 'A directory holds entries sdmesh did not write.' },
  UNEXPECTED_FILE_TYPE: { code: status.FAILED_PRECONDITION, doc: 'A FIFO, device, socket or directory where sdmesh expects a regular file (or the reverse).' },
  UNIMPLEMENTED: { code: status.UNIMPLEMENTED, doc: 'The method is not implemented by this server.' },
  UNKNOWN_METHOD: { code: status.PERMISSION_DENIED, doc: "The method is not in sdmesh's authorization table." },
  UNSUPPORTED_FORMAT_VERSION: { code: status.FAILED_PRECONDITION, doc: 'The on-disk format version is newer than this sdmesh understands.' },
  UNSUPPORTED_IMAGE: { code: status.FAILED_PRECONDITION, doc: 'The image uses features sdmesh does not support.' },
  UNSUPPORTED_TRANSFER_FORMAT: {
    code: status.INVALID_ARGUMENT,
    doc: "Image transfers serve the disk's guest data (RAW); convert a qcow2 file on the client side.",
  },
  VALUE_OUT_OF_RANGE: {
    code: status.INVALID_ARGUMENT,
    doc: 'An integer field does not fit in 64 bits as JavaScript can hold it (±2^53−1); the message names the field.',
  },
  VERIFY_MISMATCH: { code: status.DATA_LOSS, doc: "After a copy, the destination's content differs from the source's." },
  VOLUME_CHANGED: { code: status.ABORTED, doc: 'The volume changed while it was being read (a writer came in): the result would not be consistent.' },
  VOLUME_DATA_MISSING: { code: status.DATA_LOSS, doc: "The volume's record exists but its data file does not." },
  VOLUME_EXISTS: { code: status.ALREADY_EXISTS, doc: 'A volume with this id already exists.' },
  VOLUME_HAS_CHILDREN: { code: status.FAILED_PRECONDITION, doc: 'The volume has snapshots on top of it.' },
  VOLUME_ILLEGAL: { code: status.FAILED_PRECONDITION, doc: 'The volume is ILLEGAL (an unfinished or failed data operation).' },
  VOLUME_IN_USE: { code: status.ABORTED, doc: "A data job holds the volume's lease." },
  VOLUME_NOT_FOUND: { code: status.NOT_FOUND, doc: 'No volume with this id in the image.' },
  VOLUME_NOT_LEAF: { code: status.FAILED_PRECONDITION, doc: 'The operation needs the leaf (top) volume of the disk and this volume has snapshots on top.' },
  VOLUME_PREALLOCATED: { code: status.FAILED_PRECONDITION, doc: 'Preallocated volumes keep their space: they are not sparsified.' },
  WORKER_DIED: { code: status.INTERNAL, doc: 'The copy worker process died before reporting a result.' },
  WORKER_START_FAILED: { code: status.INTERNAL, doc: 'The copy worker process could not be started.' },
  WRONG_HOST: { code: status.PERMISSION_DENIED, doc: 'A host may send heartbeats only for its own name.' },
  WRONG_IDENTITY: { code: status.PERMISSION_DENIED, doc: "The caller's identity may not call this method." },
  // CSI node (issue 18)
  EXPORT_DOWN: {
    code: status.FAILED_PRECONDITION,
    doc: "The staged volume's storage daemon is gone (its lease was lost or it was killed): unstage and stage it again.",
  },
  FS_TYPE_MISMATCH: {
    code: status.FAILED_PRECONDITION,
    doc: 'The volume holds another file system than the one asked for; sdmesh never re-formats a disk that has one.',
  },
  NO_FILE_SYSTEM: { code: status.FAILED_PRECONDITION, doc: 'A read-only mount of a volume without a file system.' },
  NODE_ATTACH_FAILED: {
    code: status.INTERNAL,
    doc: 'A host program (losetup, mount, mkfs, resize2fs ...) failed while attaching a volume; the message has its error.',
  },
  NOT_STAGED: { code: status.FAILED_PRECONDITION, doc: 'The volume is not staged on this node at that staging path: NodeStageVolume first.' },
  STAGED_ELSEWHERE: { code: status.FAILED_PRECONDITION, doc: "Another host (or process) holds the volume's sanlock lease in a mode that excludes this stage." },
  STAGED_INCOMPATIBLY: {
    code: status.ALREADY_EXISTS,
    doc: 'The volume is staged or published on this node already, with another path, access type or read-only flag.',
  },
  STILL_PUBLISHED: { code: status.FAILED_PRECONDITION, doc: 'The volume is still published on this node: unpublish it before unstaging.' },
} as const satisfies Record<string, { code: status; doc: string }>;

export type Reason = keyof typeof REASONS;

/** The reasons whose code is C (what each error helper accepts). */
export type ReasonWithCode<C extends status> = { [K in Reason]: (typeof REASONS)[K]['code'] extends C ? K : never }[Reason];

/** Reason names as values, for call sites: `Reason.LEASE_HELD`. */
export const Reason = Object.fromEntries(Object.keys(REASONS).map((k) => [k, k])) as { readonly [K in Reason]: K };

/** An error with a declared reason; its status code comes from the table. */
export function fail(reason: Reason, message: string): SdmeshError {
  return new SdmeshError(REASONS[reason].code, message, reason);
}

/** Whether err (any thrown value or a decoded gRPC error) carries one of these reasons. */
export function hasReason(err: unknown, ...reasons: Reason[]): boolean {
  const r = (err as { reason?: unknown } | undefined)?.reason;
  return typeof r === 'string' && (reasons as string[]).includes(r);
}

/** Someone else holds the lease (another host, or another operation of this host). */
export const isLeaseHeld = (err: unknown) => hasReason(err, Reason.LEASE_HELD, Reason.LEASE_HELD_ON_THIS_HOST, Reason.LEASE_ALREADY_HELD);

/**
 * Another holder has the lease: another host, or another process or operation of this host
 * (not LEASE_ALREADY_HELD, where the caller itself already holds it).
 */
export const isLeaseHeldByAnother = (err: unknown) => hasReason(err, Reason.LEASE_HELD, Reason.LEASE_HELD_ON_THIS_HOST);

/** Local contention only: the lease is held by this host's own processes (worth a short retry). */
export const isLeaseHeldOnThisHost = (err: unknown) => hasReason(err, Reason.LEASE_HELD_ON_THIS_HOST, Reason.LEASE_ALREADY_HELD);

/** The volume was written by a newer writer, or fenced: the caller's view is stale. */
export const isGenerationMismatch = (err: unknown) => hasReason(err, Reason.GENERATION_MISMATCH);

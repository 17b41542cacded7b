import {
  callOptions,
  failedPrecondition,
  identityUri,
  invalidArgument,
  notFound,
  pb,
  Reason,
  service,
  type CallContext,
  type RegisteredService,
  type RolesFile,
  type StorageRoots,
} from '@sdmesh/common';
import { attachmentHandlers, type DiskAttachments } from './attachments';
import type { Cluster } from './cluster';
import { visibleRecord, type Engine } from './engine';
import { answerHeartbeat } from './host-ids';
import { parseOperationName } from './ids';
import type { KvStore } from './kv-store';
import type { OperationIndex } from './operation-index';
import type { OperationStore } from './operation-store';
import * as op from './operations';
import type { OperationKind } from './operations';
import { checkFinalizable, checkTransferController, FINALIZE, imageTransferView, transferRecord, type TransferCaller } from './operations/image-transfer';
import { knownDomain } from './operations/operation';
import { listDiskBitmaps } from './operations/volume-jobs';
import { getDisk, listDisks, listOperations, listStorageDomains, waitOperation, watchOperation } from './queries';

/**
 * The public API: the four services of scheduler.proto. Mutations route to their operation
 * kind (services/scheduler/src/operations/); reads to queries.ts. Every call to another
 * service passes on the incoming deadline and abort signal.
 */
export function schedulerServices(deps: {
  engine: Engine;
  store: OperationStore;
  cluster: Cluster;
  index: OperationIndex;
  hostIdKv: KvStore;
  storageRoots: StorageRoots;
  attachments: DiskAttachments;
  /** Users' roles (--roles-file): an admin may finalize or cancel anyone's image transfer. */
  roles?: Pick<RolesFile, 'roleOf'>;
}): RegisteredService[] {
  const { engine, store, cluster, index, storageRoots } = deps;

  /** Creates (or finds) the operation of a request: the kind validates it and names its locks. */
  const submit = <Req extends { requestId: string }, P>(
    kind: OperationKind<Req, P>,
    req: Req,
    ctx: CallContext,
    precheck?: () => Promise<void>,
  ): Promise<pb.Operation> => {
    const { requestId, ...request } = req;
    return engine.submit({
      type: kind.type,
      requestId,
      request,
      waitForLocks: kind.waitForLocks(req),
      prepare: async (operationId) => {
        await precheck?.();
        return kind.prepare({ cluster, storageRoots, call: callOptions(ctx) }, req, operationId);
      },
    });
  };

  /** A published disk is in use by what runs on its host (its attachment names the disk's domain): it is not moved, deleted or overwritten under it. */
  const refusePublished = (diskId: string, what: string) => async () => {
    if (!diskId) return;
    const { attachments } = await deps.attachments.list({ storageDomainId: '', diskId, host: '' });
    if (attachments.length > 0) {
      throw failedPrecondition(
        `disk ${diskId} is published to ${attachments.map((a) => a.host).join(', ')}: unpublish it before ${what}`,
        Reason.DISK_PUBLISHED,
      );
    }
  };

  const storageDomains = service(pb.StorageDomainServiceDefinition, {
    createStorageDomain: (req, ctx) => submit(op.createStorageDomain, req, ctx),
    removeStorageDomain: (req, ctx) => submit(op.removeStorageDomain, req, ctx),
    attachStorageDomain: (req, ctx) => submit(op.attachStorageDomain, req, ctx),
    deactivateStorageDomain: (req, ctx) => submit(op.deactivateStorageDomain, req, ctx),
    activateStorageDomain: (req, ctx) => submit(op.activateStorageDomain, req, ctx),
    getStorageDomain: async (req, ctx) => cluster.domainInfo(await knownDomain({ cluster }, req.storageDomainId), callOptions(ctx)),
    listStorageDomains: (req, ctx) => listStorageDomains(cluster, req, callOptions(ctx)),
  });

  const disks = service(pb.DiskServiceDefinition, {
    createDisk: (req, ctx) => submit(op.createDisk, req, ctx),
    deleteDisk: (req, ctx) => submit(op.deleteDisk, req, ctx, refusePublished(req.diskId, 'a delete')),
    snapshotDisk: (req, ctx) => submit(op.snapshotDisk, req, ctx),
    copyDisk: (req, ctx) => submit(op.copyDisk, req, ctx),
    moveDisk: (req, ctx) => submit(op.moveDisk, req, ctx, refusePublished(req.diskId, 'a move')),
    importDisk: (req, ctx) => submit(op.importDisk, req, ctx),
    extendDisk: (req, ctx) => submit(op.extendDisk, req, ctx),
    sparsifyDisk: (req, ctx) => submit(op.sparsifyDisk, req, ctx),
    amendDisk: (req, ctx) => submit(op.amendDisk, req, ctx),
    addDiskBitmap: (req, ctx) => submit(op.addDiskBitmap, req, ctx),
    removeDiskBitmap: (req, ctx) => submit(op.removeDiskBitmap, req, ctx),
    clearDiskBitmaps: (req, ctx) => submit(op.clearDiskBitmaps, req, ctx),
    listDiskBitmaps: (req, ctx) => listDiskBitmaps({ cluster, call: callOptions(ctx) }, req),
    markDiskTemplate: (req, ctx) => submit(op.markDiskTemplate, req, ctx),
    cloneDisk: (req, ctx) => submit(op.cloneDisk, req, ctx),
    deleteSnapshot: (req, ctx) => submit(op.deleteSnapshot, req, ctx),
    getDisk: (req, ctx) => getDisk(cluster, req, callOptions(ctx)),
    listDisks: (req, ctx) => listDisks(cluster, req, callOptions(ctx)),
  });

  const hosts = service(pb.HostServiceDefinition, {
    async listHosts() {
      return { hosts: [...cluster.hosts.hosts.values()].map((h) => cluster.hosts.toPublic(h)).sort((a, b) => a.name.localeCompare(b.name)) };
    },
    async getHost(req) {
      if (!req.host) throw invalidArgument('host is required', Reason.INVALID_HOST);
      const h = cluster.hosts.get(req.host);
      if (!h) throw notFound(`host ${req.host.slice(0, 64)} is not known`, Reason.HOST_NOT_FOUND);
      return cluster.hosts.toPublic(h);
    },
    heartbeat: (req, ctx) => answerHeartbeat(cluster, deps.hostIdKv, req, ctx),
    startHostMaintenance: (req, ctx) => submit(op.startHostMaintenance, req, ctx),
    activateHost: (req, ctx) => submit(op.activateHost, req, ctx),
  });

  const operations = service(pb.OperationServiceDefinition, {
    getOperation: (req) => engine.get(parseOperationName(req.name)),
    listOperations: (req) => listOperations(index, store, req),
    cancelOperation: async (req, ctx) => {
      const id = parseOperationName(req.name);
      const rec = visibleRecord(id, (await store.get(id))?.rec);
      // An image transfer is cancelled by its owner or an admin, whichever call asks (CancelImageTransfer's rule).
      if (rec.op.type === pb.OperationType.OPERATION_TYPE_IMAGE_TRANSFER) checkTransferController(rec, transferCaller(ctx), 'cancel');
      return engine.cancel(id);
    },
    waitOperation: (req, ctx) => waitOperation(index, req, ctx),
    watchOperation: (req, ctx) => watchOperation(index, req, ctx),
  });

  // Image transfer: Start is an operation; Finalize is a request to its running flow (like a cancel).
  const callerUri = (ctx: CallContext) => (ctx.identity.kind === 'local' || ctx.identity.kind === 'insecure' ? '' : identityUri(ctx.identity));
  const transferCaller = (ctx: CallContext): TransferCaller => ({
    uri: callerUri(ctx),
    admin: ctx.identity.kind === 'user' && deps.roles?.roleOf(ctx.identity.name) === 'admin',
  });
  const transferOf = async (name: string) => {
    const id = parseOperationName(name);
    return transferRecord(visibleRecord(id, (await store.get(id))?.rec));
  };
  const transfers = service(pb.ImageTransferServiceDefinition, {
    startImageTransfer: (req, ctx) =>
      submit(
        op.startImageTransfer,
        { ...req, owner: callerUri(ctx) },
        ctx,
        req.direction === pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD ? refusePublished(req.diskId, 'an upload') : undefined,
      ),
    getImageTransfer: async (req, ctx) => imageTransferView(await transferOf(req.name), callerUri(ctx)),
    finalizeImageTransfer: (req, ctx) =>
      engine.request(parseOperationName(req.name), FINALIZE, (rec) => {
        checkTransferController(rec, transferCaller(ctx), 'finalize');
        checkFinalizable(rec);
      }),
    cancelImageTransfer: async (req, ctx) => engine.cancel(checkTransferController(await transferOf(req.name), transferCaller(ctx), 'cancel').id),
  });

  const attachments = service(
    pb.DiskAttachmentServiceDefinition,
    attachmentHandlers(deps.attachments, (ctx) => callOptions(ctx)),
  );

  return [storageDomains, disks, hosts, operations, transfers, attachments];
}

import {
  callOptions,
  describeIdentity,
  invalidArgument,
  notFound,
  pb,
  permissionDenied,
  Reason,
  service,
  type CallContext,
  type RegisteredService,
  type StorageRoots,
} from '@sdmesh/common';
import { sleep, type Cluster } from './cluster';
import type { Engine } from './engine';
import { allocateHostId } from './host-ids';
import { parseOperationName } from './ids';
import type { KvStore } from './kv-store';
import { isTerminal, type OperationStore } from './operation-store';
import * as op from './operations';
import type { OperationKind } from './operations';
import { registeredDomain } from './operations/operation';
import { getDisk, listDisks, listOperations, listStorageDomains } from './queries';

/**
 * The public API: the four services of scheduler.proto. Mutations route to their operation
 * kind (services/scheduler/src/operations/); reads to queries.ts. Every call to another
 * service passes on the incoming deadline and abort signal.
 */
export function schedulerServices(deps: { engine: Engine; store: OperationStore; cluster: Cluster; hostIdKv: KvStore; storageRoots: StorageRoots }): RegisteredService[] {
  const { engine, store, cluster, storageRoots } = deps;

  /** Creates (or finds) the operation of a request: the kind validates it and names its locks. */
  const submit = <Req extends { requestId: string }, P>(kind: OperationKind<Req, P>, req: Req, ctx: CallContext): Promise<pb.Operation> => {
    const { requestId, ...request } = req;
    return engine.submit({
      type: kind.type,
      requestId,
      request,
      waitForLocks: kind.waitForLocks(req),
      prepare: (operationId) => kind.prepare({ cluster, storageRoots, call: callOptions(ctx) }, req, operationId),
    });
  };

  const storageDomains = service(pb.StorageDomainServiceDefinition, {
    createStorageDomain: (req, ctx) => submit(op.createStorageDomain, req, ctx),
    removeStorageDomain: (req, ctx) => submit(op.removeStorageDomain, req, ctx),
    getStorageDomain: async (req, ctx) => cluster.domainInfo(await registeredDomain({ cluster }, req.storageDomainId), callOptions(ctx)),
    listStorageDomains: (req, ctx) => listStorageDomains(cluster, req, callOptions(ctx)),
  });

  const disks = service(pb.DiskServiceDefinition, {
    createDisk: (req, ctx) => submit(op.createDisk, req, ctx),
    deleteDisk: (req, ctx) => submit(op.deleteDisk, req, ctx),
    snapshotDisk: (req, ctx) => submit(op.snapshotDisk, req, ctx),
    copyDisk: (req, ctx) => submit(op.copyDisk, req, ctx),
    moveDisk: (req, ctx) => submit(op.moveDisk, req, ctx),
    importDisk: (req, ctx) => submit(op.importDisk, req, ctx),
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
    async heartbeat(req, ctx) {
      if (!req.host) throw invalidArgument('host is required', Reason.INVALID_HOST);
      const host = pb.Host.fromPartial(req.host);
      // A host speaks only for itself: the name in its certificate is the name it announces.
      if (ctx.identity.kind === 'host' && ctx.identity.host !== host.name) {
        throw permissionDenied(`${describeIdentity(ctx.identity)} may not send heartbeats for host "${host.name.slice(0, 64)}"`, Reason.WRONG_HOST);
      }
      const hostId = await allocateHostId(deps.hostIdKv, host.name, Object.values(host.hostIds)[0] ?? 0);
      const ids: Record<string, number> = {};
      for (const d of await cluster.domains.list()) ids[d.id] = hostId;
      host.hostIds = Object.keys(ids).length ? ids : { '': hostId };
      await cluster.hosts.heartbeat(host);
      // The host joins the lockspaces it has not joined yet (on Kubernetes a new node learns the domains here).
      const domainList = (await cluster.domains.list()).filter((d) => !d.removing).map((d) => ({ storageDomainId: d.id, idsPath: cluster.idsPath(d), hostId, ioTimeoutSeconds: 0 }));
      return { hostIds: ids, domains: domainList };
    },
  });

  const operations = service(pb.OperationServiceDefinition, {
    getOperation: (req) => engine.get(parseOperationName(req.name)),
    listOperations: (req) => listOperations(store, req),
    cancelOperation: (req) => engine.cancel(parseOperationName(req.name)),
    async waitOperation(req, ctx) {
      const id = parseOperationName(req.name);
      if (!Number.isInteger(req.timeoutSeconds) || req.timeoutSeconds < 0) throw invalidArgument(`timeout_seconds ${req.timeoutSeconds} must be ≥ 0`, Reason.INVALID_TIMEOUT);
      const until = req.timeoutSeconds ? Date.now() + req.timeoutSeconds * 1000 : (ctx.deadline?.getTime() ?? Date.now() + 60_000) - 200;
      for (;;) {
        const current = await engine.get(id);
        if (isTerminal(current.status) || Date.now() >= until) return current;
        await sleep(Math.min(250, Math.max(0, until - Date.now())), ctx.signal);
      }
    },
    async *watchOperation(req, ctx: CallContext) {
      const id = parseOperationName(req.name);
      let last = '';
      for (;;) {
        const current = await engine.get(id);
        const json = JSON.stringify(pb.Operation.toJSON(current));
        if (json !== last) {
          last = json;
          yield current;
        }
        if (isTerminal(current.status)) return;
        await sleep(200, ctx.signal);
      }
    },
  });

  return [storageDomains, disks, hosts, operations];
}

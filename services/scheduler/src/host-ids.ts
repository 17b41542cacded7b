import {
  alreadyExists,
  describeIdentity,
  failedPrecondition,
  invalidArgument,
  MAX_HOST_ID,
  pb,
  permissionDenied,
  Reason,
  type CallContext,
} from '@sdmesh/common';
import type { Cluster } from './cluster';
import { epochOf, isActive } from './domains';
import type { KvStore } from './kv-store';

/** Frees the host id of a forgotten host (see HostRegistry.forgetSilentHosts). */
export async function releaseHostId(kv: KvStore, name: string): Promise<void> {
  for (const k of await kv.keys('hostid')) {
    const e = await kv.get(k);
    if (e?.value === name) await kv.delete(k, e.revision);
  }
}

/**
 * Host ids without collisions: "hostid.<n>" in KV is created (compare-and-set) with the host
 * name; a host keeps its id; a requested id held by another host is refused.
 */
export async function allocateHostId(kv: KvStore, name: string, wanted: number): Promise<number> {
  if (wanted && (!Number.isInteger(wanted) || wanted < 1 || wanted > MAX_HOST_ID))
    throw invalidArgument(`host id ${wanted} must be in 1..${MAX_HOST_ID}`, Reason.INVALID_HOST_ID);
  const keys = await kv.keys('hostid');
  for (const k of keys) {
    const e = await kv.get(k);
    if (e?.value === name) {
      const id = Number(k.split('.')[1]);
      if (wanted && wanted !== id) throw failedPrecondition(`host ${name} already has host id ${id}, not ${wanted}`, Reason.HOST_ID_MISMATCH);
      return id;
    }
  }
  const candidates = wanted ? [wanted] : Array.from({ length: MAX_HOST_ID }, (_, i) => i + 1);
  for (const id of candidates) {
    try {
      await kv.create(`hostid.${id}`, name);
      return id;
    } catch {
      const e = await kv.get(`hostid.${id}`);
      if (e?.value === name) return id;
      if (wanted) throw alreadyExists(`host id ${id} is already used by host ${e?.value ?? 'another host'}`, Reason.HOST_ID_IN_USE);
    }
  }
  throw failedPrecondition(`no free host id (1..${MAX_HOST_ID})`, Reason.NO_FREE_HOST_ID);
}

/**
 * HostService.Heartbeat: registers the host (a host speaks only for itself), gives it its host
 * id, and lists the domains it should join (on Kubernetes a new node learns them here).
 */
export async function answerHeartbeat(cluster: Cluster, hostIdKv: KvStore, req: pb.HeartbeatRequest, ctx: CallContext): Promise<pb.HeartbeatResponse> {
  if (!req.host) throw invalidArgument('host is required', Reason.INVALID_HOST);
  const host = pb.Host.fromPartial(req.host);
  // The name in its certificate is the name it announces.
  if (ctx.identity.kind === 'host' && ctx.identity.host !== host.name) {
    throw permissionDenied(`${describeIdentity(ctx.identity)} may not send heartbeats for host "${host.name.slice(0, 64)}"`, Reason.WRONG_HOST);
  }
  const hostId = await allocateHostId(hostIdKv, host.name, Object.values(host.hostIds)[0] ?? 0);
  const ids: Record<string, number> = {};
  for (const d of await cluster.domains.list()) ids[d.id] = hostId;
  host.hostIds = Object.keys(ids).length ? ids : { '': hostId };
  const state = await cluster.hosts.heartbeat(host);
  // The host joins the active domains' lockspaces it is not in (none while it is in
  // maintenance); the epoch lets its lease-manager refuse this answer if a later order made it leave.
  // It is told the leave orders too: a new node (or a lease-manager restarted without state)
  // learns them before a GC pass could join a deactivated or removed domain still on storage.
  const registered = await cluster.domains.list();
  const order = (id: string, epochMs: number) => ({ storageDomainId: id, idsPath: '', hostId, ioTimeoutSeconds: 0, epoch: epochMs });
  // While a host enters maintenance its running steps finish where they are: nothing to join, no leave yet.
  const maintenance = state.maintenance;
  const domains = maintenance ? [] : registered.filter(isActive).map((d) => ({ ...order(d.id, epochOf(d)), idsPath: cluster.idsPath(d) }));
  const leave = !maintenance
    ? (await cluster.domains.leaveOrders()).map((o) => order(o.id, o.epochMs))
    : maintenance.state === 'in'
      ? registered.map((d) => order(d.id, maintenance.epochMs))
      : [];
  return { hostIds: ids, domains, leave };
}

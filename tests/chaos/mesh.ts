import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import {
  freePort,
  LocalMesh,
  NatsCluster,
  NatsServer,
  PER_HOST_SERVICES,
  startService,
  type MeshHost,
  type RunningService,
  type ServiceName,
} from '@sdmesh/localmesh';
import { publicApi, type PublicApi } from '../harness/scheduler-mesh';
import type { History } from './history';

export type { PublicApi };

export const MiB = 1024 * 1024;
/** How long a (re)started process may take to be ready: minutes at a load average of 60. */
const START_TIMEOUT_MS = 120_000;

/**
 * A process the fault injector may kill or stop and the supervisor restarts (as Kubernetes
 * would): a per-host service, a host's sanlock daemon, nats-server or a scheduler replica.
 */
export interface Supervised {
  name: string;
  kind: 'service' | 'sanlock' | 'nats' | 'scheduler';
  pid(): number;
  running(): boolean;
  /** Starts it again (extra environment for this start only, e.g. an armed fault point). */
  start(extraEnv?: NodeJS.ProcessEnv): Promise<void>;
  /** Set while a restart is scheduled or running: the supervisor leaves it alone. */
  restarting: boolean;
  /** Killed on purpose: the supervisor starts it again only after this time (Date.now() ms). */
  downUntil: number;
}

export interface ChaosMeshOptions {
  dir: string;
  hosts: number;
  /** Environment of every service (audit log, copy throttle, test switches ...). */
  env: NodeJS.ProcessEnv;
  /** NATS nodes: 1, or a cluster on loopback (JetStream replicas min(nodes, 3)). */
  natsNodes: number;
}

/**
 * The mesh of a chaos run: LocalMesh's nats-server and hosts (sanlock + the four per-host
 * services), two scheduler replicas on fixed ports, and a supervisor that restarts any of them
 * that is dead (on the same ports, so every address stays valid).
 */
export class ChaosMesh {
  readonly mesh: LocalMesh;
  readonly targets: Supervised[] = [];
  readonly schedulers: Array<{ name: string; port: number; service?: RunningService }> = [];
  private supervisor?: NodeJS.Timeout;
  private history?: History;
  /** Set by stop(): a restart scheduled earlier starts nothing any more. */
  private stopped = false;

  constructor(readonly opts: ChaosMeshOptions) {
    this.mesh = new LocalMesh({ dir: opts.dir, hosts: opts.hosts, scheduler: false, env: opts.env, logLevel: 'info', natsNodes: opts.natsNodes });
  }

  async start(): Promise<void> {
    await this.mesh.start();
    for (const host of this.mesh.hosts) {
      this.targets.push(this.sanlockTarget(host));
      for (const svc of PER_HOST_SERVICES) this.targets.push(this.serviceTarget(host, svc));
    }
    const nats = this.mesh.nats;
    (nats instanceof NatsCluster ? nats.nodes : [nats]).forEach((node, i) => this.targets.push(this.natsTarget(node, i + 1)));
    for (const name of ['scheduler-1', 'scheduler-2']) {
      const entry = { name, port: await freePort() };
      this.schedulers.push(entry);
      const target = this.schedulerTarget(entry);
      await target.start();
      this.targets.push(target);
    }
  }

  /** Public API clients, one per replica (as the admin user). */
  publicApis(): PublicApi[] {
    const credentials = this.mesh.credentials();
    return this.schedulers.map(({ port }) => publicApi(`127.0.0.1:${port}`, credentials));
  }

  /** A per-host service's client as the scheduler (the identity per-host services serve). */
  hostClient<D extends typeof pb.GcServiceDefinition | typeof pb.LeaseManagerServiceDefinition>(host: MeshHost, svc: 'gc' | 'lease-manager', def: D) {
    return createClient(def, host.services[svc]!.grpcAddress, this.mesh.credentials({ kind: 'scheduler' }));
  }

  /** Restarts dead processes after `delayMs` (each on its own), recording exits and restarts. */
  supervise(history: History, delayMs: () => number): void {
    this.history = history;
    const seen = new Set<number>();
    this.supervisor = setInterval(() => {
      for (const t of this.targets) {
        if (t.restarting || t.running() || Date.now() < t.downUntil) continue;
        const pid = t.pid();
        if (!seen.has(pid)) {
          seen.add(pid);
          history.add({ kind: 'process-exit', target: t.name, pid, code: 'dead' });
        }
        this.restartLater(t, delayMs());
      }
    }, 250);
  }

  /** Starts `t` again after `delayMs` (retrying a failed start), unless a restart is already scheduled. */
  restartLater(t: Supervised, delayMs: number, extraEnv: NodeJS.ProcessEnv = {}): void {
    if (t.restarting) return;
    t.restarting = true;
    const attempt = async (n: number): Promise<void> => {
      if (this.stopped) return;
      try {
        await t.start(extraEnv);
        this.history?.add({
          kind: 'restart',
          target: t.name,
          pid: t.pid(),
          detail: extraEnv.SDMESH_FAULT_POINT ? `armed ${extraEnv.SDMESH_FAULT_POINT}` : undefined,
        });
        t.restarting = false;
      } catch (err) {
        this.history?.add({ kind: 'restart', target: t.name, pid: -1, detail: `start failed (attempt ${n}): ${String(err).slice(0, 300)}` });
        setTimeout(() => void attempt(n + 1), Math.min(1000 * 2 ** n, 10_000));
      }
    };
    setTimeout(() => void attempt(1), delayMs);
  }

  /** Waits until no restart is pending and every supervised process runs. */
  async waitAllRunning(timeoutMs = 120_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (this.targets.some((t) => t.restarting || !t.running())) {
      if (Date.now() > until) throw new Error(`not running: ${this.targets.filter((t) => t.restarting || !t.running()).map((t) => t.name)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.supervisor);
    for (const t of this.targets) if (t.running()) signal(t.pid(), 'SIGCONT');
    await Promise.all(this.schedulers.map((s) => s.service?.process.stop('SIGTERM', 10_000)));
    await this.mesh.stop().catch(() => undefined);
  }

  private serviceTarget(host: MeshHost, svc: ServiceName): Supervised {
    const first = host.services[svc]!;
    const ports = { grpc: first.grpcPort, metrics: first.metricsPort };
    return {
      name: `${host.name}/${svc}`,
      kind: 'service',
      restarting: false,
      downUntil: 0,
      pid: () => host.services[svc]?.process.pid ?? -1,
      running: () => !!host.services[svc]?.process.running(),
      start: async (extraEnv = {}) => {
        host.services[svc] = await startService(svc, {
          host: host.name,
          env: this.mesh.hostServiceEnv(host, svc as Exclude<ServiceName, 'scheduler'>, {
            SDMESH_GRPC_PORT: String(ports.grpc),
            SDMESH_METRICS_PORT: String(ports.metrics),
            ...extraEnv,
          }),
          logFile: path.join(this.mesh.logDir, `${host.name}-${svc}.log`),
          timeoutMs: START_TIMEOUT_MS,
        });
      },
    };
  }

  private sanlockTarget(host: MeshHost): Supervised {
    return {
      name: `${host.name}/sanlock`,
      kind: 'sanlock',
      restarting: false,
      downUntil: 0,
      pid: () => host.sanlock.pid,
      running: () => host.sanlock.running(),
      start: async () => {
        await host.sanlock.start();
      },
    };
  }

  private natsTarget(nats: NatsServer, node: number): Supervised {
    return {
      name: `nats-${node}`,
      kind: 'nats',
      restarting: false,
      downUntil: 0,
      pid: () => nats.pid,
      running: () => nats.running(),
      start: async () => {
        await nats.start();
      },
    };
  }

  private schedulerTarget(entry: { name: string; port: number; service?: RunningService }): Supervised {
    return {
      name: entry.name,
      kind: 'scheduler',
      restarting: false,
      downUntil: 0,
      pid: () => entry.service?.process.pid ?? -1,
      running: () => !!entry.service?.process.running(),
      start: async () => {
        entry.service = await startService('scheduler', {
          host: entry.name,
          env: this.mesh.schedulerEnv({
            SDMESH_GRPC_PORT: String(entry.port),
            SDMESH_HOSTS: this.mesh.hostsSpec(),
            SDMESH_TAKEOVER_MS: '3000',
            SDMESH_HOST_POLL_MS: '500',
          }),
          logFile: path.join(this.mesh.logDir, `${entry.name}.log`),
          timeoutMs: START_TIMEOUT_MS,
        });
      },
    };
  }
}

/** Sends a signal, ignoring a process that is already gone. */
export function signal(pid: number, sig: NodeJS.Signals): boolean {
  if (pid <= 0) return false;
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false;
  }
}

/** Processes started by a data-mover (copy workers) and theirs (qemu-img, qemu-io), from /proc. */
export function descendants(rootPids: number[]): Array<{ pid: number; ppid: number; comm: string; cmdline: string; root: number }> {
  const parent = new Map<number, number>();
  const comm = new Map<number, string>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const fields = stat.slice(close + 2).split(' ');
      if (fields[0] === 'Z') continue;
      parent.set(Number(entry), Number(fields[1]));
      comm.set(Number(entry), stat.slice(stat.indexOf('(') + 1, close));
    } catch {
      // gone meanwhile
    }
  }
  const roots = new Set(rootPids);
  const out: Array<{ pid: number; ppid: number; comm: string; cmdline: string; root: number }> = [];
  for (const pid of parent.keys()) {
    let p = parent.get(pid);
    for (let depth = 0; p && depth < 6; depth++) {
      if (roots.has(p)) {
        let cmdline = '';
        try {
          cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
        } catch {
          // gone
        }
        out.push({ pid, ppid: parent.get(pid) ?? 0, comm: comm.get(pid) ?? '', cmdline, root: p });
        break;
      }
      p = parent.get(p);
    }
  }
  return out;
}

/** Is this pid a live process (not gone, not a zombie)? */
export function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

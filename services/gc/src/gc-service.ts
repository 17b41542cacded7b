import path from 'node:path';
import { ConfinedRoot, DomainLayout, failedPrecondition, pb, type Logger, type ServiceHandlers, type StorageRoots, Reason } from '@sdmesh/common';
import type { GarbageCollector } from './collector';

export interface GcServiceOptions {
  collector: GarbageCollector;
  /** Domains named in the config (absolute paths beneath a storage root). */
  domains: string[];
  /** The storage roots: every domain lies beneath one; their direct subdirectories with dom_md/metadata are collected too. */
  roots: StorageRoots;
  /** Time between the end of one periodic round and the start of the next (0 = no periodic passes). */
  intervalMs: number;
  /** False when there is no lease-manager: the GC then lists but never collects. */
  canCollect: boolean;
  log: Logger;
}

/**
 * The gc service of one host: a periodic round over every known domain (one pass each, in
 * turn), the same passes on demand, per-domain status and the dry run. Passes on one domain
 * never overlap in this process (a per-domain queue); across hosts the GC lease decides.
 */
export class GcService {
  private readonly lastPasses = new Map<string, pb.GcPass>();
  private readonly queues = new Map<string, Promise<unknown>>();
  private readonly stopController = new AbortController();
  private timer?: NodeJS.Timeout;
  private round?: Promise<void>;

  constructor(private readonly opts: GcServiceOptions) {}

  /**
   * Config domains plus the domains found directly under each storage root (listed with lstat
   * semantics: a symlinked directory is not a domain), sorted, without duplicates.
   */
  async knownDomains(): Promise<string[]> {
    const found = new Set(this.opts.domains.map((d) => path.resolve(d)));
    for (const root of this.opts.roots.roots) {
      const confined = new ConfinedRoot(root);
      const names = await confined.listNames(root, ['directory']).catch(() => [] as string[]);
      for (const name of names) {
        const dir = path.join(root, name);
        if ((await confined.typeOf(new DomainLayout(dir).metadataPath).catch(() => 'absent')) === 'file') found.add(dir);
      }
    }
    return [...found].sort();
  }

  start(): void {
    if (!this.opts.canCollect || this.opts.intervalMs <= 0) return;
    const loop = () => {
      this.round = this.runRound()
        .catch((err: unknown) => this.opts.log.error({ err: String(err) }, 'gc round failed'))
        .finally(() => {
          if (!this.stopController.signal.aborted) this.timer = setTimeout(loop, this.opts.intervalMs);
        });
    };
    this.timer = setTimeout(loop, Math.min(this.opts.intervalMs, 1000));
  }

  async stop(): Promise<void> {
    this.stopController.abort();
    clearTimeout(this.timer);
    await this.round;
    await Promise.allSettled([...this.queues.values()]);
  }

  private async runRound(): Promise<void> {
    for (const domain of await this.knownDomains()) {
      if (this.stopController.signal.aborted) return;
      await this.pass(domain, this.stopController.signal);
    }
  }

  /** One pass on one domain, queued behind any pass on it already running in this process. */
  private pass(domainPath: string, signal?: AbortSignal): Promise<pb.GcPass> {
    const key = path.resolve(domainPath);
    const previous = this.queues.get(key) ?? Promise.resolve();
    const run = previous
      .catch(() => undefined)
      .then(async () => {
        const signals = [this.stopController.signal, ...(signal ? [signal] : [])];
        const pass = await this.opts.collector.collect(key, AbortSignal.any(signals));
        this.lastPasses.set(key, pass);
        return pass;
      });
    this.queues.set(key, run);
    void run
      .finally(() => {
        if (this.queues.get(key) === run) this.queues.delete(key);
      })
      .catch(() => undefined);
    return run;
  }

  async collectGarbage(req: pb.CollectGarbageRequest, signal?: AbortSignal): Promise<pb.CollectGarbageResponse> {
    const domains = req.domainPath ? [this.opts.roots.requireUnder(req.domainPath)] : await this.knownDomains();
    if (req.domainPath) await this.opts.collector.openDomain(domains[0]!); // NOT_FOUND before anything else
    if (!this.opts.canCollect) {
      throw failedPrecondition(
        'this gc has no lease-manager (SDMESH_LEASE_MANAGER_ADDRESS): it never collects without sanlock leases',
        Reason.NO_LEASE_MANAGER,
      );
    }
    const passes: pb.GcPass[] = [];
    for (const d of domains) passes.push(await this.pass(d, signal));
    return { passes };
  }

  getGcStatus(): pb.GetGcStatusResponse {
    return { lastPasses: [...this.lastPasses.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([, p]) => p) };
  }

  async listGarbage(req: pb.ListGarbageRequest): Promise<pb.ListGarbageResponse> {
    const domains = req.domainPath ? [this.opts.roots.requireUnder(req.domainPath)] : await this.knownDomains();
    const items: pb.GarbageItem[] = [];
    for (const d of domains) {
      try {
        items.push(...(await this.opts.collector.list(d)));
      } catch (err) {
        if (req.domainPath) throw err;
        this.opts.log.warn({ domain: d, err: String(err) }, 'cannot list the garbage of a domain');
      }
    }
    return { items };
  }

  handlers(): ServiceHandlers<typeof pb.GcServiceDefinition> {
    return {
      collectGarbage: (req, ctx) => this.collectGarbage(req, ctx.signal),
      getGcStatus: () => Promise.resolve(this.getGcStatus()),
      listGarbage: (req) => this.listGarbage(req),
    };
  }
}

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { CHART_DIR, DASHBOARD_FILE, helm, helmTemplate, RULES_FILE, type K8sObject } from '../../scripts/deploy-checks';

/** The kubernetes-models (or prometheus-operator models) class of an object, by apiVersion/kind. */
function modelClass(obj: K8sObject): new (data: unknown) => { validate(): void } {
  const [group, version] = obj.apiVersion.includes('/') ? obj.apiVersion.split('/') : ['', obj.apiVersion];
  const modulePath =
    group === 'monitoring.coreos.com'
      ? `@kubernetes-models/prometheus-operator/${group}/${version}/${obj.kind}`
      : group === 'cert-manager.io'
        ? `@kubernetes-models/cert-manager/${group}/${version}/${obj.kind}`
        : `kubernetes-models/${group ? group + '/' : ''}${version}/${obj.kind}`;
  const mod = require(modulePath) as Record<string, new (data: unknown) => { validate(): void }>;
  return mod[obj.kind];
}

const CI_VALUES = fs.readdirSync(path.join(CHART_DIR, 'ci')).map((f) => path.join(CHART_DIR, 'ci', f));
// The defaults plus the one value they cannot guess: the nodes that run sdmesh.
const HOSTS = ['hosts={node-a}'];
const VALUE_SETS: [string, string[], string[]][] = [
  ['defaults + hosts', [], HOSTS],
  ...CI_VALUES.map((f): [string, string[], string[]] => [path.basename(f), [f], []]),
];
/** helm template with the defaults, one host (node-a), and what the test adds. */
const render = (opts: Parameters<typeof helmTemplate>[0] = {}) => helmTemplate({ ...opts, set: [...HOSTS, ...(opts.set ?? [])] });

const byKind = (objs: K8sObject[], kind: string, nameSuffix = '') => {
  const found = objs.filter((o) => o.kind === kind && o.metadata.name.endsWith(nameSuffix));
  if (found.length !== 1) throw new Error(`expected one ${kind} *${nameSuffix}, got ${found.length}`);
  return found[0] as K8sObject & { spec: any }; // eslint-disable-line @typescript-eslint/no-explicit-any
};
const podSpec = (objs: K8sObject[], kind: string) => byKind(objs, kind).spec.template.spec;
const container = (spec: { containers: { name: string }[] }, name: string) => spec.containers.find((c) => c.name === name) as any; // eslint-disable-line @typescript-eslint/no-explicit-any
const envOf = (c: { env?: { name: string; value?: string }[] }, name: string) => c.env?.find((e) => e.name === name)?.value;

describe('helm chart helm/sdmesh', () => {
  it('has two extra value sets in ci/', () => {
    expect(CI_VALUES.length).toBeGreaterThanOrEqual(2);
  });

  it.each(VALUE_SETS)('helm lint --strict is clean with %s', (_name, files, set) => {
    const r = helm(['lint', '--strict', CHART_DIR, ...files.flatMap((f) => ['-f', f]), ...set.flatMap((x) => ['--set', x])]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('0 chart(s) failed');
  });

  it.each(VALUE_SETS)('renders with %s, and every object validates against the Kubernetes schemas', (_name, files, set) => {
    const objs = helmTemplate({ valuesFiles: files, set });
    expect(objs.length).toBeGreaterThan(8);
    for (const obj of objs) {
      const Model = modelClass(obj);
      expect(Model).toBeDefined();
      expect(() => new Model(obj).validate()).not.toThrow();
      // Standard labels on every object.
      expect(obj.metadata.labels?.['app.kubernetes.io/name']).toBe('sdmesh');
      expect(obj.metadata.labels?.['app.kubernetes.io/instance']).toBe('sdmesh');
      expect(obj.metadata.labels?.['app.kubernetes.io/managed-by']).toBe('Helm');
    }
    const kinds = objs.map((o) => o.kind);
    for (const k of ['DaemonSet', 'Deployment', 'ConfigMap', 'Service', 'PodDisruptionBudget', 'NetworkPolicy']) expect(kinds).toContain(k);
  });

  it('a model validation would catch a wrong type (the check is not a no-op)', () => {
    const objs = render();
    const ds = structuredClone(byKind(objs, 'DaemonSet'));
    ds.spec.template.spec.containers[0].ports = [{ containerPort: 'seven' }];
    expect(() => new (modelClass(ds))(ds).validate()).toThrow(/containerPort must be integer/);
  });

  describe('the per-host DaemonSet', () => {
    const objs = render();
    const spec = podSpec(objs, 'DaemonSet');

    it('runs sanlock, wdmd and the four services in one pod sharing a process namespace', () => {
      expect(spec.shareProcessNamespace).toBe(true);
      expect(spec.containers.map((c: { name: string }) => c.name).sort()).toEqual(
        ['data-mover', 'gc', 'lease-manager', 'metadata-tx', 'sanlock', 'wdmd'].sort(),
      );
    });

    it('is privileged only for sanlock and wdmd; services drop every capability', () => {
      for (const c of spec.containers) {
        const privileged = c.securityContext?.privileged === true;
        expect([c.name, privileged]).toEqual([c.name, ['sanlock', 'wdmd'].includes(c.name)]);
        if (!privileged) {
          expect(c.securityContext.capabilities.drop).toEqual(['ALL']);
          expect(c.securityContext.allowPrivilegeEscalation).toBe(false);
        }
        // The image's default user is 1000: every container of the host pod says whom it runs as.
        expect([c.name, typeof c.securityContext.runAsUser]).toEqual([c.name, 'number']);
        if (privileged) expect([c.name, c.securityContext.runAsUser]).toEqual([c.name, 0]);
      }
      expect(container(spec, 'sanlock').args).toEqual(expect.arrayContaining(['-w', '1']));
    });

    it('gives every service its ports, HTTP /healthz probes on its metrics port, the node name, the sanlock run dir and the shared storage', () => {
      for (const name of ['lease-manager', 'metadata-tx', 'data-mover', 'gc']) {
        const c = container(spec, name);
        const grpcPort = Number(envOf(c, 'SDMESH_GRPC_PORT'));
        expect(grpcPort).toBeGreaterThan(0);
        expect(Number(envOf(c, 'SDMESH_METRICS_PORT'))).toBeGreaterThan(0);
        const metricsPort = c.ports.find((p: { containerPort: number }) => p.containerPort === Number(envOf(c, 'SDMESH_METRICS_PORT'))).name;
        for (const probe of ['livenessProbe', 'readinessProbe', 'startupProbe']) {
          expect(c[probe].grpc).toBeUndefined();
          expect(c[probe].httpGet).toEqual({ path: '/healthz', port: metricsPort });
        }
        expect(c.env.find((e: { name: string }) => e.name === 'SDMESH_HOST_NAME').valueFrom.fieldRef.fieldPath).toBe('spec.nodeName');
        expect(envOf(c, 'SANLOCK_RUN_DIR')).toBe('/run/sanlock');
        expect(c.volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/var/lib/sdmesh/storage' }]));
        expect(c.resources.requests.cpu).toBeDefined();
        expect(c.resources.limits.memory).toBeDefined();
      }
      expect(container(spec, 'sanlock').volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/var/lib/sdmesh/storage' }]));
      // The lease API is a unix socket in /run/sdmesh, an in-memory emptyDir of this pod (not a hostPath).
      expect(envOf(container(spec, 'lease-manager'), 'SDMESH_LEASE_SOCKET')).toBe('/run/sdmesh/lease-manager.sock');
      for (const holder of ['metadata-tx', 'data-mover', 'gc']) {
        expect(envOf(container(spec, holder), 'SDMESH_LEASE_MANAGER_ADDRESS')).toBe('unix:///run/sdmesh/lease-manager.sock');
        expect(container(spec, holder).volumeMounts).toEqual(expect.arrayContaining([{ name: 'run-sdmesh', mountPath: '/run/sdmesh', readOnly: true }]));
      }
      expect(container(spec, 'lease-manager').volumeMounts).toEqual(
        expect.arrayContaining([{ name: 'run-sdmesh', mountPath: '/run/sdmesh', readOnly: false }]),
      );
      expect(spec.volumes.find((v: { name: string }) => v.name === 'run-sdmesh')).toEqual({
        name: 'run-sdmesh',
        emptyDir: { medium: 'Memory', sizeLimit: '1Mi' },
      });
      expect(spec.volumes.some((v: { hostPath?: { path: string } }) => v.hostPath?.path.startsWith('/run'))).toBe(false);
      expect(envOf(container(spec, 'lease-manager'), 'SDMESH_HOST_ID_FILE')).toBe('/run/sdmesh/host-id');
      // HostAgent: heartbeats to the scheduler service, announcing the pod IP and the pod's service ports.
      const lm = container(spec, 'lease-manager');
      expect(envOf(lm, 'SDMESH_SCHEDULER_ADDRESS')).toBe('sdmesh-scheduler.storage.svc:7000');
      expect(envOf(lm, 'SDMESH_ADVERTISE_ADDRESS')).toBe('$(SDMESH_POD_IP)');
      expect(Number(envOf(lm, 'SDMESH_HEARTBEAT_INTERVAL_MS'))).toBeGreaterThan(0);
      for (const [svc, env] of [
        ['metadata-tx', 'SDMESH_METADATA_TX_ADDRESS'],
        ['data-mover', 'SDMESH_DATA_MOVER_ADDRESS'],
        ['gc', 'SDMESH_GC_ADDRESS'],
      ]) {
        expect(envOf(lm, env!)).toBe(`127.0.0.1:${envOf(container(spec, svc!), 'SDMESH_GRPC_PORT')}`);
      }
      expect(spec.initContainers[0].args).toEqual(expect.arrayContaining(['host-id', '--from-label', 'sdmesh.io/host-id']));
    });

    it('reads the NATS URL, gRPC bind address and storage root from the ConfigMap', () => {
      const cm = byKind(objs, 'ConfigMap', '-config') as unknown as { data: Record<string, string> };
      // Every node of the built-in 3-node NATS cluster, by name.
      expect(cm.data.SDMESH_NATS_URL).toBe([0, 1, 2].map((i) => `nats://sdmesh-nats-${i}.sdmesh-nats-headless.storage.svc:4222`).join(','));
      expect(cm.data.SDMESH_GRPC_HOST).toBe('0.0.0.0');
      expect(cm.data.SDMESH_STORAGE_ROOTS).toBe('/var/lib/sdmesh/storage');
      expect(cm.data.SDMESH_STORAGE_ROOT).toBeUndefined();
      expect(byKind(objs, 'StatefulSet', '-nats').spec.template.spec.containers[0].args).toEqual(['nats-server', '-c', '/etc/nats/config/nats.conf']);
      expect((byKind(objs, 'ConfigMap', '-nats') as unknown as { data: Record<string, string> }).data['nats.conf']).toMatch(
        /jetstream \{\s+store_dir: \/data\/jetstream/,
      );
    });
  });

  describe('values change what they should', () => {
    it('storage.roots: SDMESH_STORAGE_ROOTS for the scheduler and the per-host services, each beneath mountPath', () => {
      const objs = render({ values: { storage: { roots: ['/var/lib/sdmesh/storage/gold', '/var/lib/sdmesh/storage/silver/'] } } });
      const cm = byKind(objs, 'ConfigMap', '-config') as unknown as { data: Record<string, string>; metadata: { name: string } };
      expect(cm.data.SDMESH_STORAGE_ROOTS).toBe('/var/lib/sdmesh/storage/gold,/var/lib/sdmesh/storage/silver');
      // Both the scheduler and the per-host containers read that ConfigMap.
      const refs = (spec: { containers: { envFrom?: { configMapRef?: { name: string } }[] }[] }) =>
        spec.containers.flatMap((c) => (c.envFrom ?? []).map((e) => e.configMapRef?.name));
      expect(refs(podSpec(objs, 'Deployment'))).toContain(cm.metadata.name);
      expect(refs(podSpec(objs, 'DaemonSet'))).toContain(cm.metadata.name);
      expect(() => render({ values: { storage: { roots: ['/mnt/elsewhere'] } } })).toThrow(
        /storage\.roots: "\/mnt\/elsewhere" is not beneath storage\.mountPath/,
      );
      expect(() => render({ values: { storage: { roots: ['relative/dir'] } } })).toThrow(/is not an absolute path/);
    });

    it('scheduler.replicas and the PodDisruptionBudget', () => {
      const objs = render({ set: ['scheduler.replicas=5'] });
      expect(byKind(objs, 'Deployment', '-scheduler').spec.replicas).toBe(5);
      expect(byKind(objs, 'PodDisruptionBudget', '-scheduler').spec.minAvailable).toBe(1);
      expect(render().find((o) => o.kind === 'Deployment')!.spec).toMatchObject({ replicas: 2 });
    });

    it('scheduler operation retention: defaults, overrides, bad values refused by the schema', () => {
      const sched = (opts?: Parameters<typeof render>[0]) => container(podSpec(render(opts), 'Deployment'), 'scheduler');
      expect([envOf(sched(), 'SDMESH_OPERATION_RETENTION_MS'), envOf(sched(), 'SDMESH_REQUEST_ID_RETENTION_MS')]).toEqual(['604800000', '2592000000']);
      const set = sched({ set: ['scheduler.operationRetentionMs=86400000', 'scheduler.requestIdRetentionMs=31536000000'] });
      expect([envOf(set, 'SDMESH_OPERATION_RETENTION_MS'), envOf(set, 'SDMESH_REQUEST_ID_RETENTION_MS')]).toEqual(['86400000', '31536000000']);
      expect(() => render({ set: ['scheduler.operationRetentionMs=0'] })).toThrow(/operationRetentionMs/);
    });

    it("host.gc: the gc's solo batch limits (--solo-batch-max-items, --solo-batch-max-ms), defaults as the gc's own, overrides, bad values refused", () => {
      const gc = (opts?: Parameters<typeof render>[0]) => container(podSpec(render(opts), 'DaemonSet'), 'gc');
      const limits = (c: Parameters<typeof envOf>[0]) => [envOf(c, 'SDMESH_SOLO_BATCH_MAX_ITEMS'), envOf(c, 'SDMESH_SOLO_BATCH_MAX_MS')];
      expect(limits(gc())).toEqual(['8000', '1000']);
      expect(limits(gc({ set: ['host.gc.soloBatchMaxItems=20000', 'host.gc.soloBatchMaxMs=2500'] }))).toEqual(['20000', '2500']);
      // Only the gc reads them.
      for (const name of ['lease-manager', 'metadata-tx', 'data-mover'])
        expect(limits(container(podSpec(render(), 'DaemonSet'), name))).toEqual([undefined, undefined]);
      expect(() => render({ set: ['host.gc.soloBatchMaxMs=0'] })).toThrow(/soloBatchMaxMs/);
      expect(() => render({ set: ['host.gc.soloBatchMaxItems=many'] })).toThrow(/soloBatchMaxItems/);
      expect(() => render({ set: ['host.gc.soloBatchMs=100'] })).toThrow(/soloBatchMs/);
    });

    it('image tags and digests', () => {
      const objs = render({
        set: ['images.host.tag=1.2.3', 'images.scheduler.repository=reg.example/sched', 'images.scheduler.digest=sha256:' + 'a'.repeat(64)],
      });
      for (const c of podSpec(objs, 'DaemonSet').containers) expect(c.image).toBe('sdmesh/sdmesh:1.2.3');
      expect(podSpec(objs, 'Deployment').containers[0].image).toBe(`reg.example/sched@sha256:${'a'.repeat(64)}`);
      expect(podSpec(render(), 'Deployment').containers[0].image).toBe('sdmesh/sdmesh:0.1.0');
      // One image for every service: each container names its service to the entrypoint.
      expect(podSpec(render(), 'Deployment').containers[0].args).toEqual(['scheduler']);
    });

    it("the image values make image writes pin every container, the built-in NATS's too, to the archive's digest", () => {
      const digest = 'sha256:' + 'b'.repeat(64);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-image-values-'));
      const file = path.join(dir, 'sdmesh-0.1.0.values.yaml');
      // The shape scripts/image.sh writes (dist/image/sdmesh-<version>.values.yaml).
      fs.writeFileSync(
        file,
        [
          'images:',
          `  host: { repository: registry.example.com/sdmesh/sdmesh, tag: "0.1.0", digest: "${digest}" }`,
          `  scheduler: { repository: registry.example.com/sdmesh/sdmesh, tag: "0.1.0", digest: "${digest}" }`,
          '',
        ].join('\n'),
      );
      try {
        for (const replicas of [1, 3]) {
          const objs = render({ valuesFiles: [file], set: [`nats.replicas=${replicas}`] });
          const images = objs
            .filter((o) => ['DaemonSet', 'Deployment', 'StatefulSet'].includes(o.kind))
            .flatMap((o: any) => [...(o.spec.template.spec.initContainers ?? []), ...o.spec.template.spec.containers]) // eslint-disable-line @typescript-eslint/no-explicit-any
            .map((c: { image: string }) => c.image);
          expect(images.length).toBeGreaterThanOrEqual(10);
          expect(new Set(images)).toEqual(new Set([`registry.example.com/sdmesh/sdmesh@${digest}`]));
          // The sdmesh image's entrypoint picks nats-server by its first argument.
          expect(container(podSpec(objs, 'StatefulSet'), 'nats').args[0]).toBe('nats-server');
        }
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
      // Another NATS image only when nats.image names one.
      const upstream = render({ set: ['nats.image.repository=nats', 'nats.image.tag=2.10.22-alpine'] });
      expect(container(podSpec(upstream, 'StatefulSet'), 'nats').image).toBe('nats:2.10.22-alpine');
      expect(container(podSpec(render(), 'StatefulSet'), 'nats').image).toBe('sdmesh/sdmesh:0.1.0');
      expect(() => render({ set: ['nats.image.digest=md5:abc'] })).toThrow(/digest/);
    });

    it('storage: hostPath or a PVC, mounted at storage.mountPath', () => {
      const host = podSpec(render({ set: ['storage.hostPath.path=/mnt/nfs/sd', 'storage.mountPath=/data'] }), 'DaemonSet');
      expect(host.volumes.find((v: { name: string }) => v.name === 'storage')).toEqual({
        name: 'storage',
        hostPath: { path: '/mnt/nfs/sd', type: 'Directory' },
      });
      expect(container(host, 'gc').volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/data' }]));

      const existing = podSpec(render({ set: ['storage.type=persistentVolumeClaim', 'storage.persistentVolumeClaim.claimName=shared-rwx'] }), 'DaemonSet');
      expect(existing.volumes.find((v: { name: string }) => v.name === 'storage')).toEqual({
        name: 'storage',
        persistentVolumeClaim: { claimName: 'shared-rwx' },
      });

      const created = render({ set: ['storage.type=persistentVolumeClaim', 'storage.persistentVolumeClaim.create=true'] });
      const pvc = byKind(created, 'PersistentVolumeClaim');
      expect(pvc.metadata.name).toBe('sdmesh-storage');
      expect(pvc.spec.accessModes).toEqual(['ReadWriteMany']);
      expect(podSpec(created, 'DaemonSet').volumes.find((v: { name: string }) => v.name === 'storage').persistentVolumeClaim.claimName).toBe('sdmesh-storage');
    });

    it('nats.url: an existing NATS replaces the built-in one', () => {
      const objs = render({ set: ['nats.url=nats://nats.messaging:4222', 'nats.deploy=false'] });
      expect((byKind(objs, 'ConfigMap', '-config') as unknown as { data: Record<string, string> }).data.SDMESH_NATS_URL).toBe('nats://nats.messaging:4222');
      expect(objs.some((o) => o.kind === 'StatefulSet')).toBe(false);
    });

    it('hostIds.source=map renders the map and refuses duplicate ids', () => {
      const objs = render({ values: { hostIds: { source: 'map', nodeIds: { 'node-a': 1, 'node-b': 2 } } } });
      expect((byKind(objs, 'ConfigMap', '-host-ids') as unknown as { data: Record<string, string> }).data).toEqual({ 'node-a': '1', 'node-b': '2' });
      expect(objs.some((o) => o.kind === 'ClusterRole')).toBe(false);
      expect(() => render({ values: { hostIds: { source: 'map', nodeIds: { 'node-a': 7, 'node-b': 7 } } } })).toThrow(
        /both have host id 7; host ids must be unique/,
      );
    });

    it('unprivileged sanlock for test clusters: no wdmd, SANLOCK_PRIVILEGED=0, -w 0 -l 0', () => {
      const spec = podSpec(render({ set: ['sanlock.privileged=false', 'sanlock.watchdog=false'] }), 'DaemonSet');
      expect(spec.containers.some((c: { name: string }) => c.name === 'wdmd')).toBe(false);
      const sl = container(spec, 'sanlock');
      expect(sl.securityContext.privileged).toBeUndefined();
      expect(envOf(sl, 'SANLOCK_PRIVILEGED')).toBe('0');
      expect(sl.args.join(' ')).toContain('-w 0 -l 0');
    });

    it('monitoring objects only when asked, with the rules file as the PrometheusRule', () => {
      expect(render().some((o) => o.apiVersion.startsWith('monitoring.coreos.com'))).toBe(false);
      const objs = render({
        set: ['monitoring.podMonitor.enabled=true', 'monitoring.prometheusRule.enabled=true', 'monitoring.grafanaDashboard.enabled=true'],
      });
      const rule = byKind(objs, 'PrometheusRule');
      expect(rule.spec).toEqual(parseYaml(fs.readFileSync(RULES_FILE, 'utf8')));
      const pm = byKind(objs, 'PodMonitor');
      expect(pm.spec.podMetricsEndpoints.map((e: { port: string }) => e.port).sort()).toEqual([
        'dm-metrics',
        'gc-metrics',
        'lm-metrics',
        'metrics',
        'mtx-metrics',
      ]);
      const dash = byKind(objs, 'ConfigMap', '-dashboard') as unknown as { data: Record<string, string> };
      expect(JSON.parse(dash.data['sdmesh.json'])).toEqual(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8')));
    });
  });

  describe('the trust boundary (docs/security.md)', () => {
    type Env = { name: string; value?: string };
    type C = { name: string; env?: Env[]; volumeMounts?: { name: string; mountPath: string; subPath?: string }[] };
    const SERVICE_CONTAINERS = ['scheduler', 'lease-manager', 'metadata-tx', 'data-mover', 'gc'];
    const objs = render({ set: ['hosts={node-a,node-b}', 'auth.users.alice=admin', 'auth.users.bob=viewer'] });
    const daemonSets = objs.filter((o) => o.kind === 'DaemonSet') as (K8sObject & { spec: any })[]; // eslint-disable-line @typescript-eslint/no-explicit-any
    const pods = [...daemonSets, byKind(objs, 'Deployment')].map((o) => o.spec.template.spec);

    it('insecure mode is refused unless a second value says the user understands it', () => {
      expect(() => render({ set: ['insecure.enabled=true'] })).toThrow(
        /insecure\.enabled=true turns off mTLS, authorization and NATS credentials.*insecure\.iUnderstandThisDisablesAuthentication=true/,
      );
      const insecure = render({ set: ['insecure.enabled=true', 'insecure.iUnderstandThisDisablesAuthentication=true'] });
      for (const spec of [podSpec(insecure, 'DaemonSet'), podSpec(insecure, 'Deployment')]) {
        for (const c of spec.containers.filter((c: C) => SERVICE_CONTAINERS.includes(c.name))) {
          expect(envOf(c, 'SDMESH_INSECURE')).toBe('true');
          expect(envOf(c, 'SDMESH_TLS_CERT')).toBeUndefined();
        }
      }
      // Secure by default: nobody gets SDMESH_INSECURE.
      expect(JSON.stringify(objs)).not.toContain('SDMESH_INSECURE');
    });

    it('the defaults alone fail with a clear message: the chart must know the nodes to give them certificates', () => {
      expect(() => helmTemplate()).toThrow(/hosts is empty: list the nodes that run sdmesh/);
    });

    it('every sdmesh container gets its TLS files from a whole Secret volume (no subPath) and SDMESH_TLS_*', () => {
      let seen = 0;
      for (const spec of pods) {
        for (const c of spec.containers.filter((c: C) => SERVICE_CONTAINERS.includes(c.name)) as C[]) {
          seen++;
          expect([c.name, envOf(c, 'SDMESH_TLS_CA'), envOf(c, 'SDMESH_TLS_CERT'), envOf(c, 'SDMESH_TLS_KEY'), envOf(c, 'SDMESH_TLS_RELOAD_MS')]).toEqual([
            c.name,
            '/etc/sdmesh/tls/ca.crt',
            '/etc/sdmesh/tls/tls.crt',
            '/etc/sdmesh/tls/tls.key',
            '10000',
          ]);
          const mount = c.volumeMounts!.find((m) => m.mountPath === '/etc/sdmesh/tls')!;
          expect(mount.subPath).toBeUndefined();
          const vol = spec.volumes.find((v: { name: string }) => v.name === mount.name);
          expect(vol.secret.secretName).toMatch(/^sdmesh-tls-/);
          for (const m of c.volumeMounts!) expect(m.subPath).toBeUndefined();
          // NATS: the workload's own user and password file.
          expect(envOf(c, 'SDMESH_NATS_PASSWORD_FILE')).toBe('/etc/sdmesh/nats/password');
        }
      }
      expect(seen).toBe(2 * 4 + 1);
    });

    it("one DaemonSet per node, pinned to it, mounting only that node's Secrets, one certificate per service", () => {
      expect(daemonSets.map((d) => d.metadata.name).sort()).toEqual(['sdmesh-host-node-a', 'sdmesh-host-node-b']);
      for (const ds of daemonSets) {
        const node = ds.metadata.labels!['sdmesh.io/node'];
        const spec = ds.spec.template.spec;
        expect(ds.spec.selector.matchLabels['sdmesh.io/node']).toBe(node);
        expect(spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms).toEqual([
          { matchFields: [{ key: 'metadata.name', operator: 'In', values: [node] }] },
        ]);
        const secrets = spec.volumes
          .filter((v: { secret?: unknown }) => v.secret)
          .map((v: { secret: { secretName: string } }) => v.secret.secretName)
          .sort();
        expect(secrets).toEqual(
          [`sdmesh-nats-user-${node}`, ...['data-mover', 'gc', 'lease-manager', 'metadata-tx'].map((svc) => `sdmesh-tls-host-${node}-${svc}`)].sort(),
        );
        for (const svc of ['lease-manager', 'metadata-tx', 'data-mover', 'gc']) {
          const c = container(spec, svc);
          const vol = c.volumeMounts.find((m: { mountPath: string }) => m.mountPath === '/etc/sdmesh/tls').name;
          expect(spec.volumes.find((v: { name: string }) => v.name === vol).secret.secretName).toBe(`sdmesh-tls-host-${node}-${svc}`);
          expect(envOf(c, 'SDMESH_NATS_USER')).toBe(node);
        }
      }
      expect(envOf(container(byKind(objs, 'Deployment').spec.template.spec, 'scheduler'), 'SDMESH_NATS_USER')).toBe('scheduler');
    });

    it('cert-manager Certificates carry the sdmesh identities as URI SANs, from a private CA by default', () => {
      const certs = objs.filter((o) => o.kind === 'Certificate') as (K8sObject & { spec: any })[]; // eslint-disable-line @typescript-eslint/no-explicit-any
      const uris = Object.fromEntries(certs.map((c) => [c.spec.secretName, c.spec.uris?.[0]]));
      expect(uris).toMatchObject({
        'sdmesh-tls-scheduler': 'sdmesh://scheduler',
        'sdmesh-tls-host-node-a-lease-manager': 'sdmesh://host/node-a/lease-manager',
        'sdmesh-tls-host-node-b-metadata-tx': 'sdmesh://host/node-b/metadata-tx',
        'sdmesh-tls-host-node-b-gc': 'sdmesh://host/node-b/gc',
        'sdmesh-tls-user-alice': 'sdmesh://user/alice',
        'sdmesh-tls-user-bob': 'sdmesh://user/bob',
      });
      expect(certs.filter((c) => c.spec.uris?.[0]?.startsWith('sdmesh://host/'))).toHaveLength(8);
      const ca = certs.find((c) => c.spec.isCA)!;
      expect(ca.spec.issuerRef.name).toBe('sdmesh-selfsigned');
      for (const c of certs.filter((c) => !c.spec.isCA)) {
        expect(c.spec.issuerRef).toEqual({ name: 'sdmesh-ca', kind: 'Issuer', group: 'cert-manager.io' });
        expect(c.spec.privateKey.rotationPolicy).toBe('Always');
      }
      expect(certs.find((c) => c.spec.secretName === 'sdmesh-tls-user-alice')!.spec.usages).toEqual(['digital signature', 'key encipherment', 'client auth']);
      // A site issuer replaces the private CA.
      const site = render({ set: ['tls.certManager.issuerRef.name=corp-ca', 'tls.certManager.issuerRef.kind=ClusterIssuer'] });
      expect(site.some((o) => o.kind === 'Issuer')).toBe(false);
      for (const c of site.filter((o) => o.kind === 'Certificate') as (K8sObject & { spec: any })[]) expect(c.spec.issuerRef.name).toBe('corp-ca'); // eslint-disable-line @typescript-eslint/no-explicit-any
      // existingSecrets: no cert-manager objects, same Secret names mounted.
      const own = render({ set: ['tls.source=existingSecrets', 'tls.secretPrefix=site-tls'] });
      expect(own.some((o) => o.apiVersion.startsWith('cert-manager.io'))).toBe(false);
      expect(podSpec(own, 'Deployment').volumes).toEqual(
        expect.arrayContaining([{ name: 'tls', secret: { secretName: 'site-tls-scheduler', defaultMode: 0o440 } }]),
      );
    });

    it('the scheduler reads user roles from a ConfigMap rendered from auth.users', () => {
      const cm = byKind(objs, 'ConfigMap', '-roles') as unknown as { data: Record<string, string> };
      expect(JSON.parse(cm.data['roles.json'])).toEqual({ users: { alice: 'admin', bob: 'viewer' } });
      const spec = podSpec(objs, 'Deployment');
      const sched = container(spec, 'scheduler');
      expect(envOf(sched, 'SDMESH_ROLES_FILE')).toBe('/etc/sdmesh/roles/roles.json');
      expect(sched.volumeMounts).toEqual(expect.arrayContaining([{ name: 'roles', mountPath: '/etc/sdmesh/roles', readOnly: true }]));
      expect(spec.volumes).toEqual(expect.arrayContaining([{ name: 'roles', configMap: { name: 'sdmesh-roles' } }]));
    });

    it('gRPC reflection is off by default (grpc.reflection turns it on)', () => {
      for (const spec of pods)
        for (const c of spec.containers.filter((c: C) => SERVICE_CONTAINERS.includes(c.name))) expect(envOf(c, 'SDMESH_GRPC_REFLECTION')).toBe('false');
      expect(envOf(container(podSpec(render({ set: ['grpc.reflection=true'] }), 'Deployment'), 'scheduler'), 'SDMESH_GRPC_REFLECTION')).toBe('true');
    });

    it('no service-account token where no container needs the API; a projected one for the host-id init container only', () => {
      for (const o of objs.filter((o) => o.kind === 'ServiceAccount'))
        expect((o as unknown as { automountServiceAccountToken: boolean }).automountServiceAccountToken).toBe(false);
      for (const o of objs.filter((o) => ['DaemonSet', 'Deployment', 'StatefulSet'].includes(o.kind))) {
        expect([o.metadata.name, (o as K8sObject & { spec: any }).spec.template.spec.automountServiceAccountToken]).toEqual([o.metadata.name, false]); // eslint-disable-line @typescript-eslint/no-explicit-any
      }
      const spec = daemonSets[0]!.spec.template.spec;
      const tokenMounts = (c: C) => (c.volumeMounts ?? []).filter((m) => m.mountPath === '/var/run/secrets/kubernetes.io/serviceaccount');
      expect(tokenMounts(spec.initContainers[0])).toHaveLength(1);
      for (const c of spec.containers) expect([c.name, tokenMounts(c)]).toEqual([c.name, []]);
      expect(spec.volumes.find((v: { name: string }) => v.name === 'kube-api-access').projected.sources[0].serviceAccountToken.expirationSeconds).toBe(3600);
      // hostIds from a map: no API access at all.
      const map = render({ values: { hostIds: { source: 'map', nodeIds: { 'node-a': 1 } } } });
      expect(JSON.stringify(map)).not.toContain('serviceAccountToken');
    });

    it("NetworkPolicies: default deny for every sdmesh pod, then only the mesh's flows", () => {
      type Np = K8sObject & { spec: any }; // eslint-disable-line @typescript-eslint/no-explicit-any
      const nps = Object.fromEntries(objs.filter((o) => o.kind === 'NetworkPolicy').map((o) => [o.metadata.name, o as Np]));
      expect(Object.keys(nps).sort()).toEqual(['sdmesh-default-deny', 'sdmesh-host', 'sdmesh-nats', 'sdmesh-scheduler']);
      const deny = nps['sdmesh-default-deny']!.spec;
      expect(deny).toEqual({
        podSelector: { matchLabels: { 'app.kubernetes.io/name': 'sdmesh', 'app.kubernetes.io/instance': 'sdmesh' } },
        policyTypes: ['Ingress', 'Egress'],
      });
      // Every pod of the release is selected by the default deny.
      for (const o of objs.filter((o) => ['DaemonSet', 'Deployment', 'StatefulSet'].includes(o.kind))) {
        expect((o as Np).spec.template.metadata.labels).toMatchObject(deny.podSelector.matchLabels);
      }
      const comp = (c: string) => ({
        podSelector: { matchLabels: { 'app.kubernetes.io/component': c, 'app.kubernetes.io/instance': 'sdmesh', 'app.kubernetes.io/name': 'sdmesh' } },
      });
      const prom = {
        namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } },
        podSelector: { matchLabels: { 'app.kubernetes.io/name': 'prometheus' } },
      };
      const host = nps['sdmesh-host']!.spec;
      expect(host.ingress).toEqual([
        { from: [comp('scheduler')], ports: [7101, 7102, 7103, 7104].map((port) => ({ protocol: 'TCP', port })) },
        { from: [prom], ports: [9101, 9102, 9103, 9104].map((port) => ({ protocol: 'TCP', port })) },
      ]);
      expect(host.egress).toEqual(
        expect.arrayContaining([
          { to: [comp('scheduler')], ports: [{ protocol: 'TCP', port: 7000 }] },
          { to: [comp('nats')], ports: [{ protocol: 'TCP', port: 4222 }] },
        ]),
      );
      const sched = nps['sdmesh-scheduler']!.spec;
      expect(sched.ingress).toEqual([{ ports: [{ protocol: 'TCP', port: 7000 }] }, { from: [prom], ports: [{ protocol: 'TCP', port: 9100 }] }]);
      expect(sched.egress[0]).toEqual({ to: [comp('host')], ports: [7101, 7102, 7103, 7104].map((port) => ({ protocol: 'TCP', port })) });
      expect(nps['sdmesh-nats']!.spec.ingress[0].from).toEqual([comp('scheduler'), comp('host')]);
      // Clients named: only they (and the hosts' heartbeats) reach the public API.
      const narrowed = render({ values: { networkPolicy: { clients: [{ namespaceSelector: { matchLabels: { team: 'virt' } } }] } } });
      const s2 = (narrowed.find((o) => o.metadata.name === 'sdmesh-scheduler' && o.kind === 'NetworkPolicy') as Np).spec;
      expect(s2.ingress[0].from).toEqual([{ namespaceSelector: { matchLabels: { team: 'virt' } } }, comp('host')]);
      expect(render({ set: ['networkPolicy.enabled=false'] }).some((o) => o.kind === 'NetworkPolicy')).toBe(false);
    });

    it('built-in NATS: TLS, one user per workload from Secrets, hosts publish only their own events', () => {
      const conf = (byKind(objs, 'ConfigMap', '-nats') as unknown as { data: Record<string, string> }).data['nats.conf'];
      expect(conf).toMatch(/tls \{\s+cert_file: \/etc\/nats\/tls\/tls\.crt/);
      expect(conf).not.toMatch(/^\s*no_auth_user/m);
      expect(conf).toContain(
        '{ user: "node-a", password: $SDMESH_NATS_PW_1, permissions: { publish: { allow: ["sdmesh.events.*.*.node-a"] }, subscribe: { deny: [">"] } } }',
      );
      expect(conf).toMatch(/\{ user: "scheduler", .*publish: \{ allow: \["\$JS\.API\.>", "\$KV\.>"/);
      // A host's subject token: its name with anything but letters, digits, _ and - as _.
      const dotted = (byKind(render({ set: ['hosts={n1.example.com}'] }), 'ConfigMap', '-nats') as unknown as { data: Record<string, string> }).data[
        'nats.conf'
      ];
      expect(dotted).toContain(
        '{ user: "n1.example.com", password: $SDMESH_NATS_PW_1, permissions: { publish: { allow: ["sdmesh.events.*.*.n1_example_com"] }',
      );
      const secrets = objs
        .filter((o) => o.kind === 'Secret')
        .map((o) => o.metadata.name)
        .sort();
      expect(secrets).toEqual(['sdmesh-nats-route', 'sdmesh-nats-user-node-a', 'sdmesh-nats-user-node-b', 'sdmesh-nats-user-scheduler']);
      const nats = byKind(objs, 'StatefulSet', '-nats').spec.template.spec;
      const userPasswords = nats.containers[0].env.filter((e: { name: string }) => e.name.startsWith('SDMESH_NATS_PW_'));
      expect(userPasswords.map((e: { valueFrom: { secretKeyRef: { name: string } } }) => e.valueFrom.secretKeyRef.name)).toEqual([
        'sdmesh-nats-user-scheduler',
        'sdmesh-nats-user-node-a',
        'sdmesh-nats-user-node-b',
      ]);
      expect(nats.volumes).toEqual(expect.arrayContaining([{ name: 'tls', secret: { secretName: 'sdmesh-tls-nats', defaultMode: 0o440 } }]));
      expect(container(nats, 'tls-reloader').command.join(' ')).toContain('nats-server --signal reload=/var/run/nats/nats.pid');
    });

    it('generated NATS passwords start with a letter (nats-server reads a $VARIABLE starting with a digit as a number and refuses it)', () => {
      // 8 renders x 4 passwords (scheduler, two hosts, routes): one in six random alphanumerics starts with a digit.
      const passwords = Array.from({ length: 8 }, () => render({ set: ['hosts={node-a,node-b}'] }))
        .flat()
        .filter((o) => o.kind === 'Secret' && o.metadata.name.startsWith('sdmesh-nats-'))
        .map((o) => Buffer.from((o as unknown as { data: { password: string } }).data.password, 'base64').toString());
      expect(passwords).toHaveLength(32);
      for (const pw of passwords) expect(pw).toMatch(/^[A-Za-z][A-Za-z0-9]{39}$/);
    });

    it('built-in NATS is a 3-node JetStream cluster: routes with mutual TLS and a password, R3 streams, one node down at a time', () => {
      const sts = byKind(objs, 'StatefulSet', '-nats').spec;
      expect([sts.replicas, sts.serviceName, sts.podManagementPolicy]).toEqual([3, 'sdmesh-nats-headless', 'Parallel']);
      const headless = byKind(objs, 'Service', '-nats-headless').spec;
      expect([headless.clusterIP, headless.publishNotReadyAddresses, headless.ports.map((p: { port: number }) => p.port)]).toEqual([
        'None',
        true,
        [4222, 6222],
      ]);
      expect(byKind(objs, 'PodDisruptionBudget', '-nats').spec.maxUnavailable).toBe(1);
      const conf = (byKind(objs, 'ConfigMap', '-nats') as unknown as { data: Record<string, string> }).data['nats.conf'];
      expect(conf).toContain('server_name: $SDMESH_NATS_SERVER_NAME');
      expect(conf).toMatch(/cluster \{\s+name: sdmesh-nats\s+port: 6222\s+no_advertise: true/);
      expect(conf).toMatch(/routes: \[\s+\$SDMESH_NATS_ROUTE_0\s+\$SDMESH_NATS_ROUTE_1\s+\$SDMESH_NATS_ROUTE_2\s+\]/);
      expect(conf).toMatch(/authorization \{\s+user: route\s+password: \$SDMESH_NATS_ROUTE_PASSWORD/);
      expect(conf).toMatch(/cluster \{[^]*tls \{[^}]*ca_file: \/etc\/nats\/tls\/ca\.crt\s+verify: true/);
      const env = sts.template.spec.containers[0].env as { name: string; value?: string; valueFrom?: { secretKeyRef?: { name: string } } }[];
      expect(env.find((e) => e.name === 'SDMESH_NATS_ROUTE_PASSWORD')?.valueFrom?.secretKeyRef?.name).toBe('sdmesh-nats-route');
      expect(envOf({ env }, 'SDMESH_NATS_ROUTE_1')).toBe(
        'nats-route://route:$(SDMESH_NATS_ROUTE_PASSWORD)@sdmesh-nats-1.sdmesh-nats-headless.storage.svc:6222',
      );
      // The node certificate names every node and is also a client certificate (routes).
      const cert = byKind(objs, 'Certificate', '-tls-nats').spec;
      expect(cert.dnsNames).toContain('*.sdmesh-nats-headless.storage.svc');
      expect(cert.usages).toEqual(expect.arrayContaining(['server auth', 'client auth']));
      // The routes (and DNS to find them) pass the NetworkPolicy.
      const np = (objs.find((o) => o.kind === 'NetworkPolicy' && o.metadata.name === 'sdmesh-nats') as K8sObject & { spec: any }).spec; // eslint-disable-line @typescript-eslint/no-explicit-any
      expect(np.ingress.at(-1).ports).toEqual([{ protocol: 'TCP', port: 6222 }]);
      expect(np.egress[0].ports).toEqual([{ protocol: 'TCP', port: 6222 }]);
      expect(envOf(container(podSpec(objs, 'Deployment'), 'scheduler'), 'SDMESH_NATS_REPLICAS')).toBe('3');
    });

    it('nats.replicas=1: a single server (no routes, R1); nats.streamReplicas for an external cluster; more replicas than nodes refused', () => {
      const single = render({ set: ['nats.replicas=1'] });
      expect(byKind(single, 'StatefulSet', '-nats').spec.replicas).toBe(1);
      expect((byKind(single, 'ConfigMap', '-config') as unknown as { data: Record<string, string> }).data.SDMESH_NATS_URL).toBe(
        'nats://sdmesh-nats.storage.svc:4222',
      );
      expect((byKind(single, 'ConfigMap', '-nats') as unknown as { data: Record<string, string> }).data['nats.conf']).not.toContain('cluster {');
      expect(single.some((o) => o.metadata.name === 'sdmesh-nats-route' || o.metadata.name === 'sdmesh-nats-headless')).toBe(false);
      expect(envOf(container(podSpec(single, 'Deployment'), 'scheduler'), 'SDMESH_NATS_REPLICAS')).toBe('1');
      const external = (streamReplicas?: number) =>
        envOf(
          container(podSpec(render({ values: { nats: { deploy: false, url: 'nats://a:4222,nats://b:4222', streamReplicas } } }), 'Deployment'), 'scheduler'),
          'SDMESH_NATS_REPLICAS',
        );
      expect([external(), external(3)]).toEqual(['1', '3']);
      expect(() => render({ set: ['nats.replicas=1', 'nats.streamReplicas=3'] })).toThrow(
        /nats\.streamReplicas \(3\) is more than the built-in NATS has nodes/,
      );
    });
  });

  it('the chart carries the same rules and dashboard as deploy/', () => {
    expect(fs.readFileSync(path.join(CHART_DIR, 'files', 'sdmesh-rules.yaml'), 'utf8')).toBe(fs.readFileSync(RULES_FILE, 'utf8'));
    expect(fs.readFileSync(path.join(CHART_DIR, 'files', 'sdmesh-dashboard.json'), 'utf8')).toBe(fs.readFileSync(DASHBOARD_FILE, 'utf8'));
  });

  describe('values.schema.json rejects bad values with a clear message', () => {
    it.each([
      ['scheduler.replicas=two', /scheduler\.replicas: Invalid type\. Expected: integer, given: string/],
      ['scheduler.replicas=1', /scheduler\.replicas: Must be greater than or equal to 2/],
      ['storage.type=nfs', /storage\.type: storage\.type must be one of the following: "hostPath", "persistentVolumeClaim"/],
      ['nats.deploy=false', /nats\.url: String length must be greater than or equal to 1/],
      ['tls.source=vault', /tls\.source: tls\.source must be one of the following: "certManager", "existingSecrets"/],
      ['auth.users.alice=root', /auth\.users\.alice: auth\.users\.alice must be one of the following: "viewer", "operator", "admin"/],
      ['hosts={Node_A}', /hosts\.0: Does not match pattern/],
      ['sanlock.privileged=false', /sanlock\.watchdog/],
      ['host.ports.gc.grpc=70000', /host\.ports\.gc\.grpc: Must be less than or equal to 65535/],
      ['schedular.replicas=3', /Additional property schedular is not allowed/],
      ['nats.replicas=2', /nats\.replicas: nats\.replicas must be one of the following: 1, 3, 5/],
      ['nats.streamReplicas=0', /nats\.streamReplicas: Must be greater than or equal to 1/],
    ])('--set %s', (set, message) => {
      const r = helm(['template', 'sdmesh', CHART_DIR, '--set', set]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain("values don't meet the specifications of the schema");
      expect(r.stderr).toMatch(message);
    });
  });

  describe('resources (docs/kubernetes.md#resources)', () => {
    /** The rows of the Resources table: container, idle and peak MiB as measured, the chart's request/limit and CPU request. */
    const rows = () => {
      const doc = fs.readFileSync(path.join(CHART_DIR, '..', '..', 'docs', 'kubernetes.md'), 'utf8');
      const section = doc.split(/^## /m).find((s) => s.startsWith('Resources\n'));
      if (!section) throw new Error('docs/kubernetes.md has no "## Resources" section');
      return section
        .split('\n')
        .filter((line) => /^\| `[a-z-]+`/.test(line))
        .map((line) => {
          const cells = line.split('|').map((c) => c.trim());
          const [request, limit] = cells[5]!.split('/').map((c) => c.trim());
          return {
            name: /`([a-z-]+)`/.exec(cells[1]!)![1]!,
            idle: parseFloat(cells[3]!),
            peak: parseFloat(cells[4]!),
            request,
            limit,
            cpu: cells[6]!.split(' ')[0],
          };
        });
    };
    const mib = (q: string) => (q.endsWith('Gi') ? parseFloat(q) * 1024 : parseFloat(q));
    // Every container that runs sdmesh code (CSI on, so its plugins render too), by name.
    const containers = () => {
      const objs = render({ set: ['csi.enabled=true'] });
      type Container = { name: string; resources: { requests: Record<string, string>; limits: Record<string, string> } };
      type PodTemplated = K8sObject & { spec?: { template?: { spec?: { initContainers?: Container[]; containers?: Container[] } } } };
      const all = new Map<string, Container>();
      for (const o of objs as PodTemplated[]) {
        const spec = o.spec?.template?.spec;
        for (const c of [...(spec?.initContainers ?? []), ...(spec?.containers ?? [])]) all.set(c.name, c);
      }
      return all;
    };

    it('gives every measured container the request and limit the table states, and the table covers the services', () => {
      const table = rows();
      expect(table.map((r) => r.name)).toEqual(
        expect.arrayContaining(['scheduler', 'lease-manager', 'metadata-tx', 'data-mover', 'gc', 'sanlock', 'host-id', 'csi-node', 'csi-controller']),
      );
      const rendered = containers();
      for (const row of table) {
        const c = rendered.get(row.name);
        expect([row.name, c === undefined]).toEqual([row.name, false]);
        expect([row.name, c!.resources.requests.memory, c!.resources.limits.memory, c!.resources.requests.cpu]).toEqual([
          row.name,
          row.request,
          row.limit,
          row.cpu,
        ]);
      }
    });

    it('follows the rule: memory request ≥ the idle figure, limit ≥ 1.5 × the peak (the data-mover: its admission bound)', () => {
      for (const row of rows()) {
        expect([row.name, mib(row.request) >= row.idle]).toEqual([row.name, true]);
        expect([row.name, mib(row.limit) >= 1.5 * row.peak]).toEqual([row.name, true]);
      }
    });
  });

  it('NOTES.txt renders, and warns about insecure mode', () => {
    // helm template does not print NOTES: render a copy of it as an ordinary template.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-chart-'));
    try {
      fs.cpSync(CHART_DIR, dir, { recursive: true });
      fs.copyFileSync(path.join(dir, 'templates', 'NOTES.txt'), path.join(dir, 'files', 'notes.txt'));
      fs.writeFileSync(path.join(dir, 'templates', 'zz-notes.yaml'), 'notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n');
      const notesOf = (set: string) => {
        const r = helm(['template', 'sdmesh', dir, '--show-only', 'templates/zz-notes.yaml', '--set', set]);
        expect(r.stderr).toBe('');
        return (parseYaml(r.stdout) as { notes: string }).notes;
      };
      const insecure = notesOf('insecure.enabled=true,insecure.iUnderstandThisDisablesAuthentication=true,sanlock.privileged=false,sanlock.watchdog=false');
      expect(insecure).toContain('kubectl label node <node> sdmesh.io/host-id=<id>');
      expect(insecure).toContain('WARNING: insecure.enabled: gRPC is PLAINTEXT with no authentication or authorization');
      expect(insecure).toContain('WARNING: sanlock runs unprivileged without a watchdog');
      const secure = notesOf('hosts={node-a,node-b},auth.users.alice=admin');
      expect(secure).toContain('mTLS: every gRPC hop; certificates from cert-manager (a private CA created for this release)');
      expect(secure).toContain('Per-host pods on: node-a, node-b');
      expect(secure).toContain('alice=admin');
      expect(secure).not.toContain('PLAINTEXT');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

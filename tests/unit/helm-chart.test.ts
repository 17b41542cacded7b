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
      : `kubernetes-models/${group ? group.replace(/^apps$/, 'apps') + '/' : ''}${version}/${obj.kind}`;
  const mod = require(modulePath) as Record<string, new (data: unknown) => { validate(): void }>;
  return mod[obj.kind];
}

const CI_VALUES = fs.readdirSync(path.join(CHART_DIR, 'ci')).map((f) => path.join(CHART_DIR, 'ci', f));
const VALUE_SETS: [string, string[]][] = [['defaults', []], ...CI_VALUES.map((f): [string, string[]] => [path.basename(f), [f]])];

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

  it.each(VALUE_SETS)('helm lint --strict is clean with %s', (_name, files) => {
    const r = helm(['lint', '--strict', CHART_DIR, ...files.flatMap((f) => ['-f', f])]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('0 chart(s) failed');
  });

  it.each(VALUE_SETS)('renders with %s, and every object validates against the Kubernetes schemas', (_name, files) => {
    const objs = helmTemplate({ valuesFiles: files });
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
    for (const k of ['DaemonSet', 'Deployment', 'ConfigMap', 'Service', 'PodDisruptionBudget']) expect(kinds).toContain(k);
  });

  it('a model validation would catch a wrong type (the check is not a no-op)', () => {
    const objs = helmTemplate();
    const ds = structuredClone(byKind(objs, 'DaemonSet'));
    ds.spec.template.spec.containers[0].ports = [{ containerPort: 'seven' }];
    expect(() => new (modelClass(ds))(ds).validate()).toThrow(/containerPort must be integer/);
  });

  describe('the per-host DaemonSet', () => {
    const objs = helmTemplate();
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
      }
      expect(container(spec, 'sanlock').args).toEqual(expect.arrayContaining(['-w', '1']));
    });

    it('gives every service its ports, gRPC health probes, the node name, the sanlock run dir and the shared storage', () => {
      for (const name of ['lease-manager', 'metadata-tx', 'data-mover', 'gc']) {
        const c = container(spec, name);
        const grpcPort = Number(envOf(c, 'SDMESH_GRPC_PORT'));
        expect(grpcPort).toBeGreaterThan(0);
        expect(Number(envOf(c, 'SDMESH_METRICS_PORT'))).toBeGreaterThan(0);
        for (const probe of ['livenessProbe', 'readinessProbe', 'startupProbe']) expect(c[probe].grpc.port).toBe(grpcPort);
        expect(c.env.find((e: { name: string }) => e.name === 'SDMESH_HOST_NAME').valueFrom.fieldRef.fieldPath).toBe('spec.nodeName');
        expect(envOf(c, 'SANLOCK_RUN_DIR')).toBe('/run/sanlock');
        expect(c.volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/var/lib/sdmesh/storage' }]));
        expect(c.resources.requests.cpu).toBeDefined();
        expect(c.resources.limits.memory).toBeDefined();
      }
      expect(container(spec, 'sanlock').volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/var/lib/sdmesh/storage' }]));
      const lmPort = envOf(container(spec, 'lease-manager'), 'SDMESH_GRPC_PORT');
      for (const holder of ['metadata-tx', 'data-mover', 'gc']) expect(envOf(container(spec, holder), 'SDMESH_LEASE_MANAGER_ADDRESS')).toBe(`127.0.0.1:${lmPort}`);
      expect(envOf(container(spec, 'lease-manager'), 'SDMESH_HOST_ID_FILE')).toBe('/run/sdmesh/host-id');
      // HostAgent: heartbeats to the scheduler service, announcing the pod IP and the pod's service ports.
      const lm = container(spec, 'lease-manager');
      expect(envOf(lm, 'SDMESH_SCHEDULER_ADDRESS')).toBe('sdmesh-scheduler.storage.svc:7000');
      expect(envOf(lm, 'SDMESH_ADVERTISE_ADDRESS')).toBe('$(SDMESH_POD_IP)');
      expect(Number(envOf(lm, 'SDMESH_HEARTBEAT_INTERVAL_MS'))).toBeGreaterThan(0);
      for (const [svc, env] of [['metadata-tx', 'SDMESH_METADATA_TX_ADDRESS'], ['data-mover', 'SDMESH_DATA_MOVER_ADDRESS'], ['gc', 'SDMESH_GC_ADDRESS']]) {
        expect(envOf(lm, env!)).toBe(`127.0.0.1:${envOf(container(spec, svc!), 'SDMESH_GRPC_PORT')}`);
      }
      expect(spec.initContainers[0].args).toEqual(expect.arrayContaining(['host-id', '--from-label', 'sdmesh.io/host-id']));
    });

    it('reads the NATS URL, gRPC bind address and storage root from the ConfigMap', () => {
      const cm = byKind(objs, 'ConfigMap', '-config') as unknown as { data: Record<string, string> };
      expect(cm.data.SDMESH_NATS_URL).toBe('nats://sdmesh-nats.storage.svc:4222');
      expect(cm.data.SDMESH_GRPC_HOST).toBe('0.0.0.0');
      expect(cm.data.SDMESH_STORAGE_ROOT).toBe('/var/lib/sdmesh/storage');
      expect(byKind(objs, 'StatefulSet', '-nats').spec.template.spec.containers[0].args).toEqual(expect.arrayContaining(['-js']));
    });
  });

  describe('values change what they should', () => {
    it('scheduler.replicas and the PodDisruptionBudget', () => {
      const objs = helmTemplate({ set: ['scheduler.replicas=5'] });
      expect(byKind(objs, 'Deployment', '-scheduler').spec.replicas).toBe(5);
      expect(byKind(objs, 'PodDisruptionBudget').spec.minAvailable).toBe(1);
      expect(helmTemplate().find((o) => o.kind === 'Deployment')!.spec).toMatchObject({ replicas: 2 });
    });

    it('image tags and digests', () => {
      const objs = helmTemplate({ set: ['images.host.tag=1.2.3', 'images.scheduler.repository=reg.example/sched', 'images.scheduler.digest=sha256:' + 'a'.repeat(64)] });
      for (const c of podSpec(objs, 'DaemonSet').containers) expect(c.image).toBe('sdmesh/sdmesh-host:1.2.3');
      expect(podSpec(objs, 'Deployment').containers[0].image).toBe(`reg.example/sched@sha256:${'a'.repeat(64)}`);
      expect(podSpec(helmTemplate(), 'Deployment').containers[0].image).toBe('sdmesh/sdmesh-scheduler:0.1.0');
    });

    it('storage: hostPath or a PVC, mounted at storage.mountPath', () => {
      const host = podSpec(helmTemplate({ set: ['storage.hostPath.path=/mnt/nfs/sd', 'storage.mountPath=/data'] }), 'DaemonSet');
      expect(host.volumes.find((v: { name: string }) => v.name === 'storage')).toEqual({ name: 'storage', hostPath: { path: '/mnt/nfs/sd', type: 'Directory' } });
      expect(container(host, 'gc').volumeMounts).toEqual(expect.arrayContaining([{ name: 'storage', mountPath: '/data' }]));

      const existing = podSpec(helmTemplate({ set: ['storage.type=persistentVolumeClaim', 'storage.persistentVolumeClaim.claimName=shared-rwx'] }), 'DaemonSet');
      expect(existing.volumes.find((v: { name: string }) => v.name === 'storage')).toEqual({ name: 'storage', persistentVolumeClaim: { claimName: 'shared-rwx' } });

      const created = helmTemplate({ set: ['storage.type=persistentVolumeClaim', 'storage.persistentVolumeClaim.create=true'] });
      const pvc = byKind(created, 'PersistentVolumeClaim');
      expect(pvc.metadata.name).toBe('sdmesh-storage');
      expect(pvc.spec.accessModes).toEqual(['ReadWriteMany']);
      expect(podSpec(created, 'DaemonSet').volumes.find((v: { name: string }) => v.name === 'storage').persistentVolumeClaim.claimName).toBe('sdmesh-storage');
    });

    it('nats.url: an existing NATS replaces the built-in one', () => {
      const objs = helmTemplate({ set: ['nats.url=nats://nats.messaging:4222', 'nats.deploy=false'] });
      expect((byKind(objs, 'ConfigMap', '-config') as unknown as { data: Record<string, string> }).data.SDMESH_NATS_URL).toBe('nats://nats.messaging:4222');
      expect(objs.some((o) => o.kind === 'StatefulSet')).toBe(false);
    });

    it('tls on mounts the Secret and sets SDMESH_TLS_*; off sets nothing', () => {
      const on = helmTemplate({ set: ['tls.enabled=true', 'tls.secretName=grpc-tls'] });
      for (const spec of [podSpec(on, 'DaemonSet'), podSpec(on, 'Deployment')]) {
        expect(spec.volumes).toEqual(expect.arrayContaining([{ name: 'tls', secret: { secretName: 'grpc-tls' } }]));
        const svc = container(spec, spec.containers.some((c: { name: string }) => c.name === 'scheduler') ? 'scheduler' : 'metadata-tx');
        expect(envOf(svc, 'SDMESH_TLS_CERT_FILE')).toBe('/etc/sdmesh/tls/tls.crt');
        expect(svc.volumeMounts).toEqual(expect.arrayContaining([{ name: 'tls', mountPath: '/etc/sdmesh/tls', readOnly: true }]));
      }
      const off = helmTemplate();
      expect(JSON.stringify(off)).not.toContain('SDMESH_TLS_');
    });

    it('hostIds.source=map renders the map and refuses duplicate ids', () => {
      const objs = helmTemplate({ values: { hostIds: { source: 'map', nodeIds: { 'node-a': 1, 'node-b': 2 } } } });
      expect((byKind(objs, 'ConfigMap', '-host-ids') as unknown as { data: Record<string, string> }).data).toEqual({ 'node-a': '1', 'node-b': '2' });
      expect(objs.some((o) => o.kind === 'ClusterRole')).toBe(false);
      expect(() => helmTemplate({ values: { hostIds: { source: 'map', nodeIds: { 'node-a': 7, 'node-b': 7 } } } })).toThrow(/both have host id 7; host ids must be unique/);
    });

    it('unprivileged sanlock for test clusters: no wdmd, SANLOCK_PRIVILEGED=0, -w 0 -l 0', () => {
      const spec = podSpec(helmTemplate({ set: ['sanlock.privileged=false', 'sanlock.watchdog=false'] }), 'DaemonSet');
      expect(spec.containers.some((c: { name: string }) => c.name === 'wdmd')).toBe(false);
      const sl = container(spec, 'sanlock');
      expect(sl.securityContext.privileged).toBeUndefined();
      expect(envOf(sl, 'SANLOCK_PRIVILEGED')).toBe('0');
      expect(sl.args.join(' ')).toContain('-w 0 -l 0');
    });

    it('monitoring objects only when asked, with the rules file as the PrometheusRule', () => {
      expect(helmTemplate().some((o) => o.apiVersion.startsWith('monitoring.coreos.com'))).toBe(false);
      const objs = helmTemplate({ set: ['monitoring.podMonitor.enabled=true', 'monitoring.prometheusRule.enabled=true', 'monitoring.grafanaDashboard.enabled=true'] });
      const rule = byKind(objs, 'PrometheusRule');
      expect(rule.spec).toEqual(parseYaml(fs.readFileSync(RULES_FILE, 'utf8')));
      const pm = byKind(objs, 'PodMonitor');
      expect(pm.spec.podMetricsEndpoints.map((e: { port: string }) => e.port).sort()).toEqual(['dm-metrics', 'gc-metrics', 'lm-metrics', 'metrics', 'mtx-metrics']);
      const dash = byKind(objs, 'ConfigMap', '-dashboard') as unknown as { data: Record<string, string> };
      expect(JSON.parse(dash.data['sdmesh.json'])).toEqual(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8')));
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
      ['tls.enabled=true', /tls\.secretName: String length must be greater than or equal to 1/],
      ['sanlock.privileged=false', /sanlock\.watchdog/],
      ['host.ports.gc.grpc=70000', /host\.ports\.gc\.grpc: Must be less than or equal to 65535/],
      ['schedular.replicas=3', /Additional property schedular is not allowed/],
    ])('--set %s', (set, message) => {
      const r = helm(['template', 'sdmesh', CHART_DIR, '--set', set]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain("values don't meet the specifications of the schema");
      expect(r.stderr).toMatch(message);
    });
  });

  it('NOTES.txt renders, and says plainly that TLS is not implemented', () => {
    // helm template does not print NOTES: render a copy of it as an ordinary template.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-chart-'));
    try {
      fs.cpSync(CHART_DIR, dir, { recursive: true });
      fs.copyFileSync(path.join(dir, 'templates', 'NOTES.txt'), path.join(dir, 'files', 'notes.txt'));
      fs.writeFileSync(path.join(dir, 'templates', 'zz-notes.yaml'), 'notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n');
      const r = helm(['template', 'sdmesh', dir, '--show-only', 'templates/zz-notes.yaml', '--set', 'tls.enabled=true,tls.secretName=t,sanlock.privileged=false,sanlock.watchdog=false']);
      expect(r.stderr).toBe('');
      const notes = (parseYaml(r.stdout) as { notes: string }).notes;
      expect(notes).toContain('kubectl label node <node> sdmesh.io/host-id=<id>');
      expect(notes).toContain('the sdmesh services do not implement TLS yet: gRPC is still PLAINTEXT');
      expect(notes).toContain('WARNING: sanlock runs unprivileged without a watchdog');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * The CSI driver's Kubernetes objects in the chart (csi.enabled): rendered offline with the
 * helm binary, every object built with its kubernetes-models class and validated (the
 * VolumeSnapshotClass, a CRD without a model here, by hand), then checked for what the driver
 * needs and for the trust boundary (privileges, API tokens, RBAC verbs, certificates).
 */
import { CHART_DIR, helm, helmTemplate, type K8sObject } from '../../scripts/deploy-checks';

type Obj = K8sObject & { spec: any }; // eslint-disable-line @typescript-eslint/no-explicit-any
type Container = {
  name: string;
  image: string;
  args?: string[];
  env?: { name: string; value?: string }[];
  securityContext?: Record<string, unknown> & { capabilities?: { drop?: string[] } };
  volumeMounts?: { name: string; mountPath: string; mountPropagation?: string; readOnly?: boolean }[];
};

const DOMAIN = '2f6d1c0e-8a4b-4c1e-9f1a-0d2b3c4d5e6f';
const OTHER_DOMAIN = '7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d';
const CSI_VALUES = {
  hosts: ['node-a', 'node-b'],
  auth: { users: { alice: 'admin' } },
  csi: {
    enabled: true,
    storageClasses: [
      { name: 'sdmesh-raw', domain: DOMAIN, default: true },
      { name: 'sdmesh-qcow2', domain: OTHER_DOMAIN, format: 'qcow2', allocation: 'preallocated', fsType: 'ext4', reclaimPolicy: 'Retain' },
    ],
  },
};
const SIDECARS = ['csi-provisioner', 'csi-attacher', 'csi-resizer', 'csi-snapshotter'];
const TOKEN_PATH = '/var/run/secrets/kubernetes.io/serviceaccount';

/** `helm template` with the CSI values above merged with `values`. */
const render = (values: Record<string, unknown> = {}, set: string[] = []) =>
  helmTemplate({ values: { ...CSI_VALUES, ...values, csi: { ...CSI_VALUES.csi, ...((values.csi as object) ?? {}) } }, set });

const find = (objs: K8sObject[], kind: string, name: string) => {
  const found = objs.filter((o) => o.kind === kind && o.metadata.name === name);
  if (found.length !== 1) throw new Error(`expected one ${kind} ${name}, got ${found.length}`);
  return found[0] as Obj;
};
const containerOf = (spec: { containers: Container[] }, name: string) => {
  const c = spec.containers.find((x) => x.name === name);
  if (!c) throw new Error(`no container ${name}`);
  return c;
};
const envOf = (c: Container, name: string) => c.env?.find((e) => e.name === name)?.value;
const mountsOf = (c: Container, volume: string) => (c.volumeMounts ?? []).filter((m) => m.name === volume);

/** The kubernetes-models (or cert-manager models) class of an object. */
function validatorOf(obj: K8sObject): (o: unknown) => void {
  const [group, version] = obj.apiVersion.includes('/') ? obj.apiVersion.split('/') : ['', obj.apiVersion];
  const modulePath =
    group === 'cert-manager.io'
      ? `@kubernetes-models/cert-manager/${group}/${version}/${obj.kind}`
      : `kubernetes-models/${group ? group + '/' : ''}${version}/${obj.kind}`;
  const Model = (require(modulePath) as Record<string, new (data: unknown) => { validate(): void }>)[obj.kind]!;
  return (o) => new Model(o).validate();
}

/**
 * snapshot.storage.k8s.io/v1 VolumeSnapshotClass (no model package): the fields its CRD
 * requires (driver, deletionPolicy Delete|Retain), string parameters, nothing else at the top.
 */
function checkVolumeSnapshotClass(o: Record<string, unknown>): void {
  const known = new Set(['apiVersion', 'kind', 'metadata', 'driver', 'deletionPolicy', 'parameters']);
  const unknown = Object.keys(o).filter((k) => !known.has(k));
  if (unknown.length) throw new Error(`VolumeSnapshotClass: unknown fields ${unknown.join(', ')}`);
  if (o.apiVersion !== 'snapshot.storage.k8s.io/v1') throw new Error(`VolumeSnapshotClass: apiVersion ${String(o.apiVersion)}`);
  if (typeof o.driver !== 'string' || !/^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$/.test(o.driver)) throw new Error('VolumeSnapshotClass: driver');
  if (o.deletionPolicy !== 'Delete' && o.deletionPolicy !== 'Retain') throw new Error('VolumeSnapshotClass: deletionPolicy must be Delete or Retain');
  if (o.parameters !== undefined && Object.values(o.parameters as object).some((v) => typeof v !== 'string'))
    throw new Error('VolumeSnapshotClass: parameters must be strings');
}

describe('helm chart: the CSI driver (csi.*)', () => {
  const objs = render();
  const controller = find(objs, 'Deployment', 'sdmesh-csi-controller').spec.template.spec as { containers: Container[]; volumes: any[] }; // eslint-disable-line @typescript-eslint/no-explicit-any
  const hostPods = objs.filter((o) => o.kind === 'DaemonSet').map((o) => (o as Obj).spec.template.spec as { containers: Container[]; volumes: any[] }); // eslint-disable-line @typescript-eslint/no-explicit-any

  it('is off by default: no CSI object, the per-host pod and the roles file as without it', () => {
    const plain = helmTemplate({ set: ['hosts={node-a}'] });
    expect(plain.filter((o) => ['CSIDriver', 'StorageClass', 'VolumeSnapshotClass', 'Role'].includes(o.kind))).toEqual([]);
    expect(plain.some((o) => o.metadata.name.includes('csi'))).toBe(false);
    const ds = plain.find((o) => o.kind === 'DaemonSet') as Obj;
    expect(ds.spec.template.spec.containers.map((c: Container) => c.name).filter((n: string) => n.startsWith('csi'))).toEqual([]);
    const roles = find(plain, 'ConfigMap', 'sdmesh-roles') as unknown as { data: Record<string, string> };
    expect(JSON.parse(roles.data['roles.json']!)).toEqual({ users: {} });
  });

  it('helm lint --strict is clean with the CSI values', () => {
    const r = helm([
      'lint',
      '--strict',
      CHART_DIR,
      '--set',
      'hosts={node-a}',
      '--set',
      'csi.enabled=true',
      '--set',
      `csi.storageClasses[0].name=gold`,
      '--set',
      `csi.storageClasses[0].domain=${DOMAIN}`,
    ]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it('every object validates against the Kubernetes schemas (VolumeSnapshotClass by its required fields)', () => {
    for (const obj of objs) {
      const check = obj.kind === 'VolumeSnapshotClass' ? (o: unknown) => checkVolumeSnapshotClass(o as Record<string, unknown>) : validatorOf(obj);
      expect(() => check(obj)).not.toThrow();
      expect(obj.metadata.labels?.['app.kubernetes.io/instance']).toBe('sdmesh');
    }
    // The checks are not no-ops: a wrong type, a missing required field are caught.
    const driver = structuredClone(find(objs, 'CSIDriver', 'csi.sdmesh.io'));
    driver.spec.attachRequired = 'yes';
    expect(() => validatorOf(driver)(driver)).toThrow(/attachRequired/);
    const vsc = structuredClone(find(objs, 'VolumeSnapshotClass', 'sdmesh')) as Record<string, unknown>;
    delete vsc.deletionPolicy;
    expect(() => checkVolumeSnapshotClass(vsc)).toThrow(/deletionPolicy/);
  });

  it('CSIDriver csi.sdmesh.io: attach required, pod info on mount, persistent volumes, fsGroup by file, storage capacity', () => {
    expect(find(objs, 'CSIDriver', 'csi.sdmesh.io').spec).toEqual({
      attachRequired: true,
      podInfoOnMount: true,
      volumeLifecycleModes: ['Persistent'],
      fsGroupPolicy: 'File',
      storageCapacity: true,
      requiresRepublish: false,
    });
  });

  it('a StorageClass per configured domain: its parameters, expansion, late binding on nodes that reach the domain', () => {
    const raw = find(objs, 'StorageClass', 'sdmesh-raw') as unknown as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    expect(raw).toMatchObject({
      provisioner: 'csi.sdmesh.io',
      parameters: { domain: DOMAIN, format: 'raw', allocation: 'sparse', 'csi.storage.k8s.io/fstype': 'ext4' },
      reclaimPolicy: 'Delete',
      allowVolumeExpansion: true,
      volumeBindingMode: 'WaitForFirstConsumer',
      allowedTopologies: [{ matchLabelExpressions: [{ key: `topology.csi.sdmesh.io/domain-${DOMAIN}`, values: ['true'] }] }],
    });
    expect(raw.metadata.annotations['storageclass.kubernetes.io/is-default-class']).toBe('true');
    const qcow2 = find(objs, 'StorageClass', 'sdmesh-qcow2') as unknown as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    expect(qcow2.parameters).toEqual({ domain: OTHER_DOMAIN, format: 'qcow2', allocation: 'preallocated', 'csi.storage.k8s.io/fstype': 'ext4' });
    expect([qcow2.reclaimPolicy, qcow2.metadata.annotations]).toEqual(['Retain', undefined]);
    expect(qcow2.allowedTopologies[0].matchLabelExpressions[0].key).toBe(`topology.csi.sdmesh.io/domain-${OTHER_DOMAIN}`);
    const vsc = find(objs, 'VolumeSnapshotClass', 'sdmesh') as unknown as Record<string, unknown>;
    expect([vsc.driver, vsc.deletionPolicy]).toEqual(['csi.sdmesh.io', 'Delete']);
    expect(render({ csi: { volumeSnapshotClass: { enabled: false } } }).some((o) => o.kind === 'VolumeSnapshotClass')).toBe(false);
  });

  it('the controller Deployment: the sdmesh plugin with the five sidecars on one socket, pinned sidecar images', () => {
    expect(controller.containers.map((c) => c.name)).toEqual(['csi-controller', ...SIDECARS, 'csi-liveness']);
    const plugin = containerOf(controller, 'csi-controller');
    expect(plugin.image).toBe('sdmesh/sdmesh:0.1.0');
    expect(plugin.args).toEqual(['csi', '--mode', 'controller', '--csi-endpoint', 'unix:///csi/csi.sock']);
    expect(envOf(plugin, 'SDMESH_SCHEDULER_ADDRESS')).toBe('sdmesh-scheduler.storage.svc:7000');
    for (const c of controller.containers) {
      expect([c.name, mountsOf(c, 'socket-dir').map((m) => m.mountPath)]).toEqual([c.name, ['/csi']]);
      if (c.name !== 'csi-controller') {
        expect(c.args).toContain('--csi-address=/csi/csi.sock');
        expect(c.image).toMatch(/^registry\.k8s\.io\/sig-storage\/[a-z-]+:v\d+\.\d+\.\d+$/);
      }
      expect([c.name, c.securityContext?.privileged]).toEqual([c.name, undefined]);
      expect(c.securityContext?.capabilities?.drop).toEqual(['ALL']);
      expect(c.securityContext?.readOnlyRootFilesystem).toBe(true);
    }
    expect(controller.volumes.find((v) => v.name === 'socket-dir')).toEqual({ name: 'socket-dir', emptyDir: { medium: 'Memory', sizeLimit: '1Mi' } });
    const provisioner = containerOf(controller, 'csi-provisioner');
    expect(provisioner.args).toEqual(
      expect.arrayContaining([
        '--feature-gates=Topology=true',
        '--enable-capacity',
        '--capacity-ownerref-level=2',
        '--extra-create-metadata',
        '--leader-election',
      ]),
    );
    // Capacity objects are owned through the pod: it needs its own name and namespace.
    expect((provisioner.env ?? []).map((e) => e.name).sort()).toEqual(['NAMESPACE', 'POD_NAME']);
    for (const s of ['csi-attacher', 'csi-resizer', 'csi-snapshotter']) expect(containerOf(controller, s).args).toContain('--leader-election');
    expect(containerOf(controller, 'csi-liveness').args).toContain('--http-endpoint=:9808');
    const digest = 'sha256:' + 'b'.repeat(64);
    const pinned = containerOf(
      find(render({}, [`csi.images.attacher.digest=${digest}`]), 'Deployment', 'sdmesh-csi-controller').spec.template.spec,
      'csi-attacher',
    );
    expect(pinned.image).toBe(`registry.k8s.io/sig-storage/csi-attacher@${digest}`);
  });

  it('the Kubernetes API token reaches the four external-* sidecars only, never the sdmesh container', () => {
    expect(find(objs, 'Deployment', 'sdmesh-csi-controller').spec.template.spec.automountServiceAccountToken).toBe(false);
    expect((find(objs, 'ServiceAccount', 'sdmesh-csi-controller') as unknown as { automountServiceAccountToken: boolean }).automountServiceAccountToken).toBe(
      false,
    );
    for (const c of controller.containers) {
      const token = (c.volumeMounts ?? []).filter((m) => m.mountPath === TOKEN_PATH);
      expect([c.name, token.length]).toEqual([c.name, SIDECARS.includes(c.name) ? 1 : 0]);
    }
    expect(controller.volumes.find((v) => v.name === 'kube-api-access').projected.sources[0].serviceAccountToken.expirationSeconds).toBe(3600);
  });

  it('RBAC: a ClusterRole and a Role per sidecar with the verbs it documents, bound to the controller ServiceAccount; no wildcard', () => {
    const rules = (kind: string, sidecar: string) =>
      Object.fromEntries(
        (find(objs, kind, `sdmesh-csi-${sidecar}`) as unknown as { rules: { apiGroups: string[]; resources: string[]; verbs: string[] }[] }).rules.map((r) => [
          `${r.apiGroups[0] ? r.apiGroups[0] + '/' : ''}${r.resources.join(',')}`,
          r.verbs.join(','),
        ]),
      );
    const leases = { 'coordination.k8s.io/leases': 'get,watch,list,delete,update,create' };
    const events = { events: 'list,watch,create,update,patch' };
    expect(rules('ClusterRole', 'provisioner')).toEqual({
      persistentvolumes: 'get,list,watch,create,patch,delete',
      persistentvolumeclaims: 'get,list,watch,update',
      'storage.k8s.io/storageclasses': 'get,list,watch',
      ...events,
      'snapshot.storage.k8s.io/volumesnapshots': 'get,list',
      'snapshot.storage.k8s.io/volumesnapshotcontents': 'get,list',
      'storage.k8s.io/csinodes': 'get,list,watch',
      nodes: 'get,list,watch',
      'storage.k8s.io/volumeattachments': 'get,list,watch',
    });
    expect(rules('Role', 'provisioner')).toEqual({
      ...leases,
      'storage.k8s.io/csistoragecapacities': 'get,list,watch,create,update,patch,delete',
      pods: 'get',
      'apps/replicasets': 'get',
    });
    expect(rules('ClusterRole', 'attacher')).toEqual({
      persistentvolumes: 'get,list,watch,patch',
      'storage.k8s.io/csinodes': 'get,list,watch',
      'storage.k8s.io/volumeattachments': 'get,list,watch,patch',
      'storage.k8s.io/volumeattachments/status': 'patch',
    });
    expect(rules('ClusterRole', 'resizer')).toEqual({
      persistentvolumes: 'get,list,watch,patch',
      persistentvolumeclaims: 'get,list,watch',
      pods: 'get,list,watch',
      'persistentvolumeclaims/status': 'patch',
      ...events,
      'storage.k8s.io/volumeattributesclasses': 'get,list,watch',
    });
    expect(rules('ClusterRole', 'snapshotter')).toEqual({
      ...events,
      'snapshot.storage.k8s.io/volumesnapshotclasses': 'get,list,watch',
      'snapshot.storage.k8s.io/volumesnapshotcontents': 'get,list,watch,update,patch',
      'snapshot.storage.k8s.io/volumesnapshotcontents/status': 'update,patch',
    });
    for (const s of ['attacher', 'resizer', 'snapshotter']) expect(rules('Role', s)).toEqual(leases);
    for (const s of ['provisioner', 'attacher', 'resizer', 'snapshotter'])
      for (const [kind, roleKind] of [
        ['ClusterRoleBinding', 'ClusterRole'],
        ['RoleBinding', 'Role'],
      ] as const) {
        const b = find(objs, kind, `sdmesh-csi-${s}`) as unknown as { roleRef: { kind: string; name: string }; subjects: unknown[] };
        expect(b.roleRef).toMatchObject({ kind: roleKind, name: `sdmesh-csi-${s}` });
        expect(b.subjects).toEqual([{ kind: 'ServiceAccount', name: 'sdmesh-csi-controller', namespace: 'storage' }]);
      }
    expect(JSON.stringify(objs.filter((o) => o.kind.endsWith('Role')))).not.toContain('"*"');
  });

  it('the per-host pod gains the node plugin (privileged, kubelet dir Bidirectional, /dev, its sanlock and lease socket) and node-driver-registrar', () => {
    expect(hostPods).toHaveLength(2);
    for (const spec of hostPods) {
      const names = spec.containers.map((c) => c.name);
      expect(names).toEqual(expect.arrayContaining(['sanlock', 'lease-manager', 'csi-node', 'csi-node-driver-registrar', 'csi-node-liveness']));
      const node = containerOf(spec, 'csi-node');
      expect(node.args).toEqual(['csi', '--mode', 'node', '--csi-endpoint', 'unix:///csi/csi.sock']);
      expect(node.securityContext).toMatchObject({ privileged: true, runAsUser: 0 });
      expect(mountsOf(node, 'csi-kubelet-dir')).toEqual([{ name: 'csi-kubelet-dir', mountPath: '/var/lib/kubelet', mountPropagation: 'Bidirectional' }]);
      expect(mountsOf(node, 'csi-dev')).toEqual([{ name: 'csi-dev', mountPath: '/dev' }]);
      // The same sanlock run dir and lease-manager socket as the pod's lease holders.
      expect(mountsOf(node, 'sanlock-run')).toEqual(mountsOf(containerOf(spec, 'metadata-tx'), 'sanlock-run'));
      expect(mountsOf(node, 'run-sdmesh')).toEqual([{ name: 'run-sdmesh', mountPath: '/run/sdmesh', readOnly: true }]);
      expect(envOf(node, 'SDMESH_LEASE_MANAGER_ADDRESS')).toBe('unix:///run/sdmesh/lease-manager.sock');
      expect(envOf(node, 'SANLOCK_RUN_DIR')).toBe('/run/sanlock');
      const registrar = containerOf(spec, 'csi-node-driver-registrar');
      expect(registrar.args).toContain('--kubelet-registration-path=/var/lib/kubelet/plugins/csi.sdmesh.io/csi.sock');
      expect(mountsOf(registrar, 'csi-registration-dir')[0]!.mountPath).toBe('/registration');
      expect(containerOf(spec, 'csi-node-liveness').args).toContain('--http-endpoint=:9809');
      const hostPath = (name: string) => spec.volumes.find((v) => v.name === name)?.hostPath;
      expect(hostPath('csi-plugin-dir')).toEqual({ path: '/var/lib/kubelet/plugins/csi.sdmesh.io', type: 'DirectoryOrCreate' });
      expect(hostPath('csi-registration-dir')).toEqual({ path: '/var/lib/kubelet/plugins_registry', type: 'Directory' });
      expect(hostPath('csi-kubelet-dir')).toEqual({ path: '/var/lib/kubelet', type: 'Directory' });
      expect(hostPath('csi-dev')).toEqual({ path: '/dev', type: 'Directory' });
      expect(hostPath('csi-node-state')).toEqual({ path: '/var/lib/sdmesh-csi', type: 'DirectoryOrCreate' });
      // Only sanlock, wdmd and the node plugin are privileged; no CSI container has an API token.
      expect(
        spec.containers
          .filter((c) => c.securityContext?.privileged === true)
          .map((c) => c.name)
          .sort(),
      ).toEqual(['csi-node', 'sanlock', 'wdmd']);
      for (const c of spec.containers.filter((x) => x.name.startsWith('csi')))
        expect((c.volumeMounts ?? []).some((m) => m.mountPath === TOKEN_PATH)).toBe(false);
      for (const c of ['csi-node-driver-registrar', 'csi-node-liveness']) expect(containerOf(spec, c).securityContext?.capabilities?.drop).toEqual(['ALL']);
    }
    // csi.node.kubeletDir follows a distribution's kubelet root.
    const k0s = render({ csi: { node: { kubeletDir: '/var/lib/k0s/kubelet' } } }).find((o) => o.kind === 'DaemonSet') as Obj;
    expect(containerOf(k0s.spec.template.spec, 'csi-node-driver-registrar').args).toContain(
      '--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/csi.sdmesh.io/csi.sock',
    );
  });

  it("the controller's identity: a user certificate (client auth only) with the role the roles file gives it", () => {
    const cert = find(objs, 'Certificate', 'sdmesh-tls-user-csi-controller').spec;
    expect(cert.uris).toEqual(['sdmesh://user/csi-controller']);
    expect(cert.usages).toEqual(['digital signature', 'key encipherment', 'client auth']);
    expect(cert.issuerRef).toEqual({ name: 'sdmesh-ca', kind: 'Issuer', group: 'cert-manager.io' });
    const plugin = containerOf(controller, 'csi-controller');
    expect(envOf(plugin, 'SDMESH_TLS_CERT')).toBe('/etc/sdmesh/tls/tls.crt');
    expect(mountsOf(plugin, 'tls')).toEqual([{ name: 'tls', mountPath: '/etc/sdmesh/tls', readOnly: true }]);
    expect(controller.volumes.find((v) => v.name === 'tls').secret.secretName).toBe('sdmesh-tls-user-csi-controller');
    const roles = (o: K8sObject[]) => JSON.parse((find(o, 'ConfigMap', 'sdmesh-roles') as unknown as { data: Record<string, string> }).data['roles.json']!);
    expect(roles(objs)).toEqual({ users: { alice: 'admin', 'csi-controller': 'operator' } });
    // Another name and role; own Secrets (no Certificate) with tls.source=existingSecrets.
    const own = render({ tls: { source: 'existingSecrets' }, csi: { controller: { user: 'k8s-csi', role: 'admin' } } });
    expect(roles(own).users['k8s-csi']).toBe('admin');
    expect(own.some((o) => o.kind === 'Certificate')).toBe(false);
    const ownSpec = find(own, 'Deployment', 'sdmesh-csi-controller').spec.template.spec;
    expect(ownSpec.volumes.find((v: { name: string }) => v.name === 'tls').secret.secretName).toBe('sdmesh-tls-user-k8s-csi');
    // The same user in auth.users would get two roles and two certificates: refused.
    expect(() => render({ auth: { users: { 'csi-controller': 'viewer' } } })).toThrow(/csi\.controller\.user "csi-controller" is also in auth\.users/);
  });

  it('insecure mode: no certificate, no TLS environment', () => {
    const insecure = render({ insecure: { enabled: true, iUnderstandThisDisablesAuthentication: true }, sanlock: { privileged: false, watchdog: false } });
    expect(insecure.some((o) => o.kind === 'Certificate')).toBe(false);
    const plugin = containerOf(find(insecure, 'Deployment', 'sdmesh-csi-controller').spec.template.spec, 'csi-controller');
    expect(envOf(plugin, 'SDMESH_INSECURE')).toBe('true');
    expect(mountsOf(plugin, 'tls')).toEqual([]);
    expect(containerOf((insecure.find((o) => o.kind === 'DaemonSet') as Obj).spec.template.spec, 'csi-node').args![0]).toBe('csi');
  });

  it('NetworkPolicies: the controller reaches the scheduler, the API server and DNS; the scheduler admits it even with narrowed clients', () => {
    const narrowed = render({ networkPolicy: { clients: [{ namespaceSelector: { matchLabels: { team: 'virt' } } }] } });
    const ctl = find(narrowed, 'NetworkPolicy', 'sdmesh-csi-controller').spec;
    const component = (c: string) => ({ 'app.kubernetes.io/name': 'sdmesh', 'app.kubernetes.io/instance': 'sdmesh', 'app.kubernetes.io/component': c });
    expect(ctl.podSelector.matchLabels).toEqual(component('csi-controller'));
    expect(ctl.ingress).toBeUndefined();
    expect(ctl.egress[0]).toEqual({ to: [{ podSelector: { matchLabels: component('scheduler') } }], ports: [{ protocol: 'TCP', port: 7000 }] });
    expect(ctl.egress[1].ports).toEqual([
      { protocol: 'TCP', port: 443 },
      { protocol: 'TCP', port: 6443 },
    ]);
    const sched = find(narrowed, 'NetworkPolicy', 'sdmesh-scheduler-from-csi').spec;
    expect(sched.podSelector.matchLabels).toEqual(component('scheduler'));
    expect(sched.ingress).toEqual([{ from: [{ podSelector: { matchLabels: component('csi-controller') } }], ports: [{ protocol: 'TCP', port: 7000 }] }]);
    // Under the release's default deny like every other pod.
    expect(find(narrowed, 'Deployment', 'sdmesh-csi-controller').spec.template.metadata.labels).toMatchObject(
      find(narrowed, 'NetworkPolicy', 'sdmesh-default-deny').spec.podSelector.matchLabels,
    );
  });

  describe('values.schema.json rejects bad CSI values with a clear message', () => {
    it.each([
      ['csi.storageClasses[0].domain=gold', /csi\.storageClasses\.0\.domain: Does not match pattern/],
      ['csi.storageClasses[0].format=vmdk', /csi\.storageClasses\.0\.format: csi\.storageClasses\.0\.format must be one of the following: "raw", "qcow2"/],
      ['csi.images.provisioner.tag=', /csi\.images\.provisioner\.tag: String length must be greater than or equal to 1/],
      ['csi.controller.role=viewer', /csi\.controller\.role: csi\.controller\.role must be one of the following: "operator", "admin"/],
      ['csi.defaultFsType=xfs', /csi\.defaultFsType: csi\.defaultFsType must be one of the following: "ext4"/],
      ['csi.provisioner=x', /Additional property provisioner is not allowed/],
    ])('--set %s', (set, message) => {
      const base = ['hosts={node-a}', 'csi.enabled=true', 'csi.storageClasses[0].name=gold', `csi.storageClasses[0].domain=${DOMAIN}`];
      const r = helm(['template', 'sdmesh', CHART_DIR, ...[...base, set].flatMap((s) => ['--set', s])]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(message);
    });
  });
});

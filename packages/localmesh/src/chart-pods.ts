/**
 * Runs the Helm chart's rendered pods as podman pods, the way a kubelet would run them, for the
 * mesh as containers (container-mesh.ts: `make demo-containers` and the containers test,
 * tests/containers/). podman 4.3's `kube play` cannot take them as they are (no
 * DaemonSet/StatefulSet, no downward-API spec.nodeName/status.podIP, HTTP probes run as curl
 * inside the container), so this reads the pod templates of the rendered DaemonSets, Deployment
 * and StatefulSet and turns each field into podman's equivalent: one pod per workload (shared
 * pid namespace where the spec asks for it), init containers run to completion first, env
 * (values, $(VAR) references, fieldRef, secretKeyRef, envFrom configMapRef), args, command,
 * volumes (emptyDir, configMap, secret, hostPath, volume claims as directories), users, groups,
 * capabilities, privilege escalation and read-only root filesystems. Every container port is
 * published on 127.0.0.1 so the test reaches the pods from outside, as kubelet's probes do.
 * Certificates are issued for the chart's cert-manager Certificates by a local CA, acting as
 * cert-manager (same Secret names, same URI SANs and DNS names).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { K8sObject } from './chart';
import { LocalPki } from './pki';
import { REPO_ROOT } from './service-process';

// Loosely typed Kubernetes objects: the chart's own tests validate them against the schemas.
/* eslint-disable @typescript-eslint/no-explicit-any */
type Any = any;

export const CONTAINERS_CONF = path.join(REPO_ROOT, 'deploy', 'docker', 'containers.conf');

export function podman(args: string[], opts: { allowFail?: boolean; input?: string } = {}): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('podman', args, {
    encoding: 'utf8',
    input: opts.input,
    env: { ...process.env, CONTAINERS_CONF: process.env.CONTAINERS_CONF ?? CONTAINERS_CONF },
    maxBuffer: 64 << 20,
  });
  const out = { status: r.status ?? 1, stdout: r.stdout ?? '', stderr: r.stderr ?? String(r.error ?? '') };
  if (out.status !== 0 && !opts.allowFail) throw new Error(`podman ${args.join(' ')}: exit ${out.status}: ${out.stderr.trim()}`);
  return out;
}

export interface Probe {
  kind: 'startup' | 'readiness' | 'liveness';
  container: string;
  spec: Any;
}

export interface RunningPod {
  /** The workload's pod name (DaemonSet name for the per-host pods). */
  name: string;
  podmanPod: string;
  ip: string;
  node?: string;
  spec: Any;
  /** containerPort -> port on 127.0.0.1. */
  ports: Map<number, number>;
  containerName(container: string): string;
}

export interface ChartPodsOptions {
  /** Prefix of every podman object this run creates (pods, containers, network). */
  prefix: string;
  workDir: string;
  objects: K8sObject[];
  namespace: string;
  /** Chart image reference -> local image, and the command to use when the spec gives none. */
  images: (image: string) => { image: string; entrypoint?: string[] };
}

/** Issues the Secrets of the chart's Certificates (cert-manager's part) and collects Secrets and ConfigMaps. */
export class ChartPods {
  readonly secrets = new Map<string, Record<string, Buffer>>();
  readonly configMaps = new Map<string, Record<string, string>>();
  readonly pods: RunningPod[] = [];
  readonly pki: LocalPki;
  readonly network: string;
  private readonly hosts = new Map<string, string>();

  constructor(private readonly o: ChartPodsOptions) {
    this.network = `${o.prefix}net`;
    this.pki = new LocalPki(path.join(o.workDir, 'pki'), `${o.prefix} CA`).ensure();
    for (const obj of o.objects as Any[]) {
      if (obj.kind === 'ConfigMap') this.configMaps.set(obj.metadata.name, obj.data ?? {});
      if (obj.kind === 'Secret') {
        const data: Record<string, Buffer> = {};
        for (const [k, v] of Object.entries(obj.data ?? {})) data[k] = Buffer.from(String(v), 'base64');
        for (const [k, v] of Object.entries(obj.stringData ?? {})) data[k] = Buffer.from(String(v));
        this.secrets.set(obj.metadata.name, data);
      }
      if (obj.kind === 'Certificate' && !obj.spec.isCA) this.issue(obj);
    }
  }

  /** cert-manager's part: a key pair and certificate with the Certificate's URIs and DNS names. */
  private issue(cert: Any): void {
    const sans = [...(cert.spec.uris ?? []).map((u: string) => `URI:${u}`), ...(cert.spec.dnsNames ?? []).map((d: string) => `DNS:${d}`)];
    const files = this.pki.issue(cert.spec.secretName, sans);
    this.secrets.set(cert.spec.secretName, {
      'ca.crt': fs.readFileSync(files.ca),
      'tls.crt': fs.readFileSync(files.cert),
      'tls.key': fs.readFileSync(files.key),
    });
  }

  workload(kind: string, name: string): Any {
    const obj = (this.o.objects as Any[]).find((x) => x.kind === kind && x.metadata.name === name);
    if (!obj) throw new Error(`no ${kind} ${name} in the rendered chart`);
    return obj;
  }

  createNetwork(): void {
    podman(['network', 'create', this.network]);
  }

  /** Runs one pod template: pod, init containers to completion, then the containers. */
  async runPod(name: string, template: Any, opts: { node?: string; serviceNames?: string[]; volumeClaims?: Any[] } = {}): Promise<RunningPod> {
    const spec = template.spec;
    const podmanPod = `${this.o.prefix}${name}`;
    const podDir = path.join(this.o.workDir, 'pods', name);
    fs.mkdirSync(podDir, { recursive: true });
    const ports = [
      ...new Set([...(spec.initContainers ?? []), ...spec.containers].flatMap((c: Any) => (c.ports ?? []).map((p: Any) => p.containerPort as number))),
    ];
    const share = spec.shareProcessNamespace ? 'pid,net,ipc,uts' : 'net,ipc,uts';
    const create = ['pod', 'create', '--name', podmanPod, '--share', share, '--network', this.network, '--hostname', name.slice(0, 63)];
    for (const [host, ip] of this.hosts) create.push('--add-host', `${host}:${ip}`);
    for (const p of ports) create.push('-p', `127.0.0.1::${p}`);
    podman(create);
    podman(['pod', 'start', podmanPod]);
    const infra = podman(['pod', 'inspect', podmanPod, '--format', '{{.InfraContainerID}}']).stdout.trim();
    const ip = podman(['inspect', infra, '--format', `{{(index .NetworkSettings.Networks "${this.network}").IPAddress}}`]).stdout.trim();
    const published = new Map<number, number>();
    for (const line of podman(['port', infra]).stdout.trim().split('\n').filter(Boolean)) {
      const m = /^(\d+)\/tcp -> [\d.]+:(\d+)$/.exec(line.trim());
      if (m) published.set(Number(m[1]), Number(m[2]));
    }
    for (const svc of opts.serviceNames ?? []) this.hosts.set(svc, ip);
    const pod: RunningPod = { name, podmanPod, ip, node: opts.node, spec, ports: published, containerName: (c) => `${podmanPod}-${c}` };
    this.pods.push(pod);

    const volumes = this.volumes(spec, podDir, opts.volumeClaims ?? []);
    for (const c of spec.initContainers ?? []) {
      const r = podman(['run', '--pod', podmanPod, ...this.containerArgs(pod, spec, c, volumes), ...this.command(pod, c)], { allowFail: true });
      podman(['rm', '-f', pod.containerName(c.name)], { allowFail: true });
      if (r.status !== 0) throw new Error(`init container ${c.name} of ${name} failed (exit ${r.status}): ${r.stderr.trim()}`);
    }
    for (const c of spec.containers) podman(['run', '-d', '--pod', podmanPod, ...this.containerArgs(pod, spec, c, volumes), ...this.command(pod, c)]);
    return pod;
  }

  /** The image and its arguments: `command` replaces the entrypoint, `args` the CMD. */
  private command(pod: RunningPod, c: Any): string[] {
    const { image, entrypoint } = this.o.images(c.image);
    const env = this.env(c, pod);
    const expand = (s: string) => s.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, v) => env.get(v) ?? m);
    const args = (c.args ?? []).map((a: string) => expand(String(a)));
    const cmd = c.command ?? entrypoint;
    if (cmd) return [`--entrypoint=${JSON.stringify(cmd.map((a: string) => expand(String(a))))}`, image, ...args];
    return [image, ...args];
  }

  private env(c: Any, pod: RunningPod | undefined): Map<string, string> {
    const env = new Map<string, string>();
    for (const from of c.envFrom ?? []) {
      if (from.configMapRef) for (const [k, v] of Object.entries(this.configMaps.get(from.configMapRef.name) ?? {})) env.set(k, String(v));
      if (from.secretRef) for (const [k, v] of Object.entries(this.secrets.get(from.secretRef.name) ?? {})) env.set(k, v.toString());
    }
    for (const e of c.env ?? []) {
      let value: string | undefined;
      if (e.value !== undefined) value = String(e.value).replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (m, v) => env.get(v) ?? m);
      else if (e.valueFrom?.fieldRef) {
        const f = e.valueFrom.fieldRef.fieldPath;
        value =
          f === 'spec.nodeName'
            ? (pod?.node ?? 'node-unset')
            : f === 'status.podIP'
              ? (pod?.ip ?? '')
              : f === 'metadata.name'
                ? (pod?.name ?? '')
                : f === 'metadata.namespace'
                  ? this.o.namespace
                  : undefined;
        if (value === undefined) throw new Error(`fieldRef ${f} is not supported by the containers harness`);
      } else if (e.valueFrom?.secretKeyRef) {
        const s = this.secrets.get(e.valueFrom.secretKeyRef.name)?.[e.valueFrom.secretKeyRef.key];
        if (s === undefined) throw new Error(`secretKeyRef ${e.valueFrom.secretKeyRef.name}/${e.valueFrom.secretKeyRef.key}: no such Secret key`);
        value = s.toString();
      } else if (e.valueFrom?.configMapKeyRef) value = this.configMaps.get(e.valueFrom.configMapKeyRef.name)?.[e.valueFrom.configMapKeyRef.key];
      if (value !== undefined) env.set(e.name, value);
    }
    return env;
  }

  /** Volumes as host directories: name -> directory. */
  private volumes(spec: Any, podDir: string, claims: Any[]): Map<string, string> {
    const out = new Map<string, string>();
    const fsGroup: number | undefined = spec.securityContext?.fsGroup;
    const own = (p: string) => {
      if (fsGroup !== undefined) fs.chownSync(p, 0, fsGroup);
    };
    const writeFiles = (dir: string, files: Record<string, Buffer | string>, items: Any[] | undefined, mode: number) => {
      fs.mkdirSync(dir, { recursive: true });
      own(dir);
      const list: [string, string][] = items ? items.map((i: Any) => [i.key, i.path]) : Object.keys(files).map((k) => [k, k]);
      for (const [key, rel] of list) {
        if (files[key] === undefined) throw new Error(`volume key ${key} missing`);
        const file = path.join(dir, rel);
        fs.writeFileSync(file, files[key]!);
        fs.chmodSync(file, mode);
        own(file);
      }
    };
    for (const v of [...(spec.volumes ?? []), ...claims.map((c: Any) => ({ name: c.metadata.name, claim: true }))]) {
      const dir = path.join(podDir, 'volumes', v.name);
      if (v.hostPath) {
        if (v.hostPath.type === 'DirectoryOrCreate') fs.mkdirSync(v.hostPath.path, { recursive: true });
        if (v.hostPath.type === 'Directory' && !fs.statSync(v.hostPath.path).isDirectory()) throw new Error(`hostPath ${v.hostPath.path} is not a directory`);
        out.set(v.name, v.hostPath.path);
        continue;
      }
      if (v.emptyDir || v.claim) {
        fs.mkdirSync(dir, { recursive: true });
        // emptyDir is world-writable (kubelet makes it 0777); a claim gets the pod's fsGroup.
        fs.chmodSync(dir, v.emptyDir ? 0o777 : 0o2775);
        own(dir);
      } else if (v.configMap) {
        const data = this.configMaps.get(v.configMap.name);
        if (!data) throw new Error(`configMap ${v.configMap.name} is not in the rendered chart`);
        writeFiles(dir, data, v.configMap.items, v.configMap.defaultMode ?? 0o644);
      } else if (v.secret) {
        const data = this.secrets.get(v.secret.secretName);
        if (!data) throw new Error(`Secret ${v.secret.secretName} is neither rendered nor issued`);
        writeFiles(dir, data, v.secret.items, v.secret.defaultMode ?? 0o644);
      } else throw new Error(`volume ${v.name}: kind not supported by the containers harness`);
      out.set(v.name, dir);
    }
    return out;
  }

  private containerArgs(pod: RunningPod, spec: Any, c: Any, volumes: Map<string, string>): string[] {
    const args = ['--name', pod.containerName(c.name), '--pull=never'];
    const sc = { ...(spec.securityContext ?? {}), ...(c.securityContext ?? {}) };
    if (sc.runAsUser !== undefined) args.push('--user', `${sc.runAsUser}:${sc.runAsGroup ?? sc.runAsUser}`);
    for (const g of [
      ...(spec.securityContext?.supplementalGroups ?? []),
      ...(spec.securityContext?.fsGroup !== undefined ? [spec.securityContext.fsGroup] : []),
    ])
      args.push('--group-add', String(g));
    if (sc.privileged) args.push('--privileged');
    if (sc.capabilities?.drop) for (const cap of sc.capabilities.drop) args.push('--cap-drop', cap);
    if (sc.capabilities?.add) for (const cap of sc.capabilities.add) args.push('--cap-add', cap);
    if (sc.allowPrivilegeEscalation === false) args.push('--security-opt', 'no-new-privileges');
    if (sc.readOnlyRootFilesystem) args.push('--read-only');
    for (const [k, v] of this.env(c, pod)) args.push('-e', `${k}=${v}`);
    for (const m of c.volumeMounts ?? []) {
      const src = volumes.get(m.name);
      if (!src) throw new Error(`container ${c.name} mounts ${m.name}, which the pod does not declare`);
      args.push('-v', `${src}:${m.mountPath}${m.readOnly ? ':ro' : ''}`);
    }
    return args;
  }

  /** A probe as kubelet runs it: HTTP GET from outside the pod, or exec inside the container. */
  async probe(pod: RunningPod, container: string, probe: Any): Promise<{ ok: boolean; detail: string }> {
    if (probe.httpGet) {
      const c = pod.spec.containers.find((x: Any) => x.name === container);
      const port = typeof probe.httpGet.port === 'number' ? probe.httpGet.port : c.ports.find((p: Any) => p.name === probe.httpGet.port)?.containerPort;
      const hostPort = pod.ports.get(port);
      if (!hostPort) return { ok: false, detail: `port ${probe.httpGet.port} is not published` };
      try {
        const res = await fetch(`http://127.0.0.1:${hostPort}${probe.httpGet.path}`, { signal: AbortSignal.timeout((probe.timeoutSeconds ?? 1) * 1000) });
        await res.text();
        return { ok: res.status >= 200 && res.status < 400, detail: `GET ${probe.httpGet.path} on ${probe.httpGet.port}: HTTP ${res.status}` };
      } catch (err) {
        return { ok: false, detail: `GET ${probe.httpGet.path}: ${(err as Error).message}` };
      }
    }
    if (probe.exec) {
      const r = podman(['exec', pod.containerName(container), ...probe.exec.command], { allowFail: true });
      return { ok: r.status === 0, detail: `exec ${probe.exec.command.join(' ')}: exit ${r.status}` };
    }
    if (probe.grpc) return { ok: false, detail: 'grpc probes are not run by the containers harness' };
    return { ok: false, detail: 'unknown probe kind' };
  }

  /** Every probe the chart declares for the containers of this pod. */
  probes(pod: RunningPod): Probe[] {
    const out: Probe[] = [];
    for (const c of pod.spec.containers)
      for (const kind of ['startup', 'readiness', 'liveness'] as const) if (c[`${kind}Probe`]) out.push({ kind, container: c.name, spec: c[`${kind}Probe`] });
    return out;
  }

  /** Waits until every probe of every pod passes (or throws with the ones that do not). */
  async waitReady(pods: RunningPod[], timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (signal?.aborted) throw new Error('interrupted while waiting for the probes');
      const failing: string[] = [];
      for (const pod of pods)
        for (const p of this.probes(pod)) {
          const r = await this.probe(pod, p.container, p.spec);
          if (!r.ok) failing.push(`${pod.name}/${p.container} ${p.kind}: ${r.detail}`);
        }
      if (!failing.length) return;
      // A container that exited will not come back (nothing restarts it here): fail now.
      const exited = pods
        .flatMap((pod) => pod.spec.containers.map((c: Any) => [pod, c.name] as const))
        .filter(([pod, c]) => this.state(pod, c).status !== 'running');
      if (exited.length)
        throw new Error(`containers exited: ${exited.map(([pod, c]) => pod.containerName(c)).join(', ')}\n${failing.join('\n')}\n${this.logs(pods)}`);
      if (Date.now() > deadline) throw new Error(`probes still failing after ${timeoutMs} ms:\n${failing.join('\n')}\n${this.logs(pods)}`);
      await new Promise((r) => setTimeout(r, 2000));
    }
  }

  state(pod: RunningPod, container: string): { status: string; exitCode: number } {
    const out = podman(['inspect', pod.containerName(container), '--format', '{{.State.Status}} {{.State.ExitCode}}'])
      .stdout.trim()
      .split(' ');
    return { status: out[0]!, exitCode: Number(out[1]) };
  }

  /** The last log lines of every container that is not running (for failure messages). */
  logs(pods: RunningPod[] = this.pods, lines = 15): string {
    const out: string[] = [];
    for (const pod of pods)
      for (const c of pod.spec.containers) {
        const r = podman(['logs', '--tail', String(lines), pod.containerName(c.name)], { allowFail: true });
        out.push(`--- ${pod.containerName(c.name)}\n${(r.stdout + r.stderr).trim()}`);
      }
    return out.join('\n');
  }

  /**
   * Stops and removes every pod, container and the network of this run (their names start with
   * its prefix: a pod whose start was interrupted goes too, nothing else does); returns what was
   * still there afterwards.
   */
  cleanup(): string[] {
    for (const pod of this.pods.reverse()) {
      // sanlock ignores SIGTERM while it holds a lockspace: its preStop hook first, as kubelet would.
      for (const c of pod.spec.containers) {
        const pre = c.lifecycle?.preStop?.exec?.command;
        if (pre) podman(['exec', pod.containerName(c.name), ...pre], { allowFail: true });
      }
      podman(['pod', 'rm', '-f', '-t', '5', pod.podmanPod], { allowFail: true });
    }
    this.pods.length = 0;
    for (const pod of this.leftovers().pods) podman(['pod', 'rm', '-f', '-t', '5', pod], { allowFail: true });
    for (const c of this.leftovers().containers) podman(['rm', '-f', '-t', '5', c], { allowFail: true });
    podman(['network', 'rm', '-f', this.network], { allowFail: true });
    const left = this.leftovers();
    return [...left.containers, ...left.pods, ...left.networks];
  }

  /** The containers, pods and networks of this run that exist (by their prefix). */
  leftovers(): { containers: string[]; pods: string[]; networks: string[] } {
    const names = (args: string[]) =>
      podman(args, { allowFail: true })
        .stdout.split('\n')
        .map((n) => n.trim())
        .filter((n) => n.startsWith(this.o.prefix));
    return {
      containers: names(['ps', '-a', '--format', '{{.Names}}']),
      pods: names(['pod', 'ps', '--format', '{{.Name}}']),
      networks: names(['network', 'ls', '--format', '{{.Name}}']),
    };
  }
}

/** `podman image exists`. */
export function imageExists(ref: string): boolean {
  return podman(['image', 'exists', ref], { allowFail: true }).status === 0;
}

/** sha256 of a disk's guest-visible bytes, read on the host (outside the containers) with qemu-img. */
export function guestChecksum(file: string, format: string, tmpDir: string): string {
  const raw = path.join(tmpDir, `guest-${process.pid}-${Date.now()}.raw`);
  try {
    execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', file, raw]);
    return execFileSync('sha256sum', [raw], { encoding: 'utf8' }).split(' ')[0]!;
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

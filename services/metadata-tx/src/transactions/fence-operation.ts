/**
 * FenceOperation: under the domain metadata lease, record that an operation is aborted
 * (dom_md/fence_<operationId>_<ms>, operation-fences.ts); from then on no CreateVolume of it
 * commits in the domain. Changes no slot and no committed volume, so the hold's slot index stays.
 */
import { DEFAULT_FENCE_RETENTION_MS, pb, validateDomainPath, validateId } from '@sdmesh/common';
import { writeFence } from '../operation-fences';
import type { TransactionCore, TransactionKind } from './core';

interface FenceOperationParams {
  root: string;
  operationId: string;
}

async function fenceOperation(tx: TransactionCore, p: FenceOperationParams, signal?: AbortSignal): Promise<pb.FenceOperationResponse> {
  const domain = await tx.openDomain(p.root);
  const domainId = domain.md.domainId;
  // No overlap keys: it starts only once every create of the hold in flight has ended.
  await tx.underDomainLease(domain, { operationId: p.operationId, signal, keepsSlotIndex: true }, async (hold) => {
    const record = { domainId, operationId: p.operationId, fencedMs: Date.now(), hostId: tx.hostId };
    try {
      const outcome = await writeFence(domain.dom, domain.root, record, {
        retentionMs: tx.opts.fenceRetentionMs ?? DEFAULT_FENCE_RETENTION_MS,
        txid: tx.newTxId(),
      });
      tx.fences.added(domainId, hold, p.operationId);
      tx.opts.log?.info({ domainId, operationId: p.operationId, outcome }, 'operation fenced: no create of it commits in this domain');
    } catch (err) {
      tx.fences.forget(domainId);
      throw err;
    }
  });
  return {};
}

export const fenceOperationTransaction: TransactionKind<pb.FenceOperationRequest, FenceOperationParams, pb.FenceOperationResponse> = {
  op: 'fence_operation',
  params: (req) => ({ root: validateDomainPath(req.domainPath), operationId: validateId('operation id', req.operationId) }),
  run: fenceOperation,
};

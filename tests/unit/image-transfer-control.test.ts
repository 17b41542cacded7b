import { fail, GrpcStatus, pb, Reason, SdmeshError, unavailable } from '@sdmesh/common';
import type { FlowContext, StepRun } from '../../services/scheduler/src/engine';
import type { OperationRecord } from '../../services/scheduler/src/operation-store';
import {
  checkFinalizable,
  checkTransferController,
  checkTransferDisk,
  followTransfer,
  imageTransferView,
  validateTransferRequest,
  type ImageTransferParams,
} from '../../services/scheduler/src/operations/image-transfer';
import type { RunEnv } from '../../services/scheduler/src/operations/operation';

/** The image transfer control plane's checks that need no mesh (services/scheduler/src/operations/image-transfer.ts). */

const DISK = '33333333-3333-4333-8333-333333333333';
const UPLOAD = pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD;
const DOWNLOAD = pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD;

const request = (over: Partial<pb.StartImageTransferRequest>) =>
  pb.StartImageTransferRequest.fromPartial({ requestId: 'r', storageDomainId: DISK, diskId: DISK, direction: UPLOAD, ...over });

function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return (err as SdmeshError).reason;
  }
  return 'OK';
}

const volume = (over: Partial<pb.Volume>) =>
  pb.Volume.fromPartial({ id: 'v1', legality: pb.Legality.LEGALITY_LEGAL, capacityBytes: 1 << 20, format: pb.VolumeFormat.VOLUME_FORMAT_RAW, ...over });

describe('image transfer requests', () => {
  it('takes defaults: RAW, 60 s of inactivity, no bitmap', () => {
    expect(validateTransferRequest(request({}))).toEqual({ direction: 'upload', idleTimeoutMs: 60_000, bitmap: '' });
    expect(validateTransferRequest(request({ direction: DOWNLOAD, bitmap: 'b-1', inactivityTimeoutSeconds: 5 }))).toEqual({
      direction: 'download',
      idleTimeoutMs: 5000,
      bitmap: 'b-1',
    });
  });

  it.each([
    ['no direction', { direction: pb.TransferDirection.TRANSFER_DIRECTION_UNSPECIFIED }, 'INVALID_TRANSFER_DIRECTION'],
    ['an unknown direction', { direction: 9 as pb.TransferDirection }, 'INVALID_TRANSFER_DIRECTION'],
    ['an unknown format', { format: 7 as pb.TransferFormat }, 'INVALID_FORMAT'],
    ['the qcow2 wire format', { format: pb.TransferFormat.TRANSFER_FORMAT_QCOW2 }, 'UNSUPPORTED_TRANSFER_FORMAT'],
    ['a negative timeout', { inactivityTimeoutSeconds: -1 }, 'INVALID_TIMEOUT'],
    ['a timeout above an hour', { inactivityTimeoutSeconds: 3601 }, 'INVALID_TIMEOUT'],
    ['a bitmap on an upload', { bitmap: 'b' }, 'INVALID_BITMAP_NAME'],
    ['a bad bitmap name', { direction: DOWNLOAD, bitmap: '../x' }, 'INVALID_BITMAP_NAME'],
    ['a negative upload size', { uploadSizeBytes: -512 }, 'INVALID_CAPACITY'],
    ['an upload size on a download', { direction: DOWNLOAD, uploadSizeBytes: 512 }, 'INVALID_CAPACITY'],
  ])('refuses %s', (_what, over, reason) => {
    expect(refusal(() => validateTransferRequest(request(over)))).toBe(reason);
  });
});

describe('disks an image transfer may use', () => {
  it.each([
    ['a template upload', [volume({ template: true })], 'upload', 0, 'DISK_IS_TEMPLATE'],
    ['an upload to a disk with snapshots', [volume({}), volume({ id: 'v2', parentId: 'v1' })], 'upload', 0, 'DISK_HAS_SNAPSHOTS'],
    ['an image larger than the disk', [volume({})], 'upload', (1 << 20) + 512, 'IMAGE_LARGER_THAN_DISK'],
    ['a thin clone', [volume({ parentId: 't', parentImageId: 'timg' })], 'download', 0, 'DISK_IS_CLONE'],
    ['a download of an ILLEGAL disk', [volume({ legality: pb.Legality.LEGALITY_ILLEGAL })], 'download', 0, 'DISK_ILLEGAL'],
  ] as const)('refuses %s', (_what, volumes, direction, size, reason) => {
    expect(refusal(() => checkTransferDisk(DISK, [...volumes], direction, size))).toBe(reason);
  });

  it('accepts a download of a template or a chain, and an upload onto an ILLEGAL one-volume disk (how a failed upload is redone)', () => {
    expect(refusal(() => checkTransferDisk(DISK, [volume({ template: true })], 'download', 0))).toBe('OK');
    expect(refusal(() => checkTransferDisk(DISK, [volume({}), volume({ id: 'v2', parentId: 'v1' })], 'download', 0))).toBe('OK');
    expect(refusal(() => checkTransferDisk(DISK, [volume({ legality: pb.Legality.LEGALITY_ILLEGAL })], 'upload', 1 << 20))).toBe('OK');
  });
});

const params: ImageTransferParams = {
  domainId: DISK,
  diskId: DISK,
  direction: 'upload',
  volumeIds: ['v1'],
  generation: 0,
  leafWasLegal: true,
  capacityBytes: 1 << 20,
  sizeBytes: 1 << 20,
  bitmap: '',
  owner: 'sdmesh://user/alice',
  ticketId: 'x'.repeat(43),
  idleTimeoutMs: 60_000,
  maxDurationMs: 3_600_000,
};

describe('the view of a transfer and its finalize', () => {
  const record = (
    status: pb.OperationStatus,
    state: Record<string, unknown>,
    over: Partial<OperationRecord<ImageTransferParams>> = {},
  ): OperationRecord<ImageTransferParams> => ({
    id: 'abc',
    op: pb.Operation.fromPartial({ name: 'operations/abc', type: pb.OperationType.OPERATION_TYPE_IMAGE_TRANSFER, status, createTime: new Date(0) }),
    fingerprint: '',
    params,
    locks: [],
    waitForLocks: false,
    locksHeld: true,
    owner: 's1',
    ownerBeatMs: 0,
    cancelRequested: false,
    state,
    ...over,
  });
  const running = pb.OperationStatus.OPERATION_STATUS_RUNNING;
  const open = { results: { open: { host: 'host1', url: 'https://host1:1/images/' + params.ticketId } } };

  it('gives the URL only to the user who started it, and only while it is open', () => {
    expect(imageTransferView(record(running, open), 'sdmesh://user/alice')).toMatchObject({
      phase: pb.TransferPhase.TRANSFER_PHASE_READY,
      host: 'host1',
      url: open.results.open.url,
    });
    expect(imageTransferView(record(running, open), 'sdmesh://user/bob').url).toBe('');
    expect(imageTransferView(record(running, {}), 'sdmesh://user/alice')).toMatchObject({ phase: pb.TransferPhase.TRANSFER_PHASE_INITIALIZING, url: '' });
    const finalizing = imageTransferView(record(running, open, { requests: { finalize: 1 } }), 'sdmesh://user/alice');
    expect(finalizing).toMatchObject({ phase: pb.TransferPhase.TRANSFER_PHASE_FINALIZING, url: '' });
    expect(imageTransferView(record(pb.OperationStatus.OPERATION_STATUS_DONE, open), 'sdmesh://user/alice')).toMatchObject({
      phase: pb.TransferPhase.TRANSFER_PHASE_ENDED,
      url: '',
    });
  });

  it('finalizes an open transfer (again too), not one still opening, ended, cancelled or of another type', () => {
    expect(refusal(() => checkFinalizable(record(running, open)))).toBe('OK');
    expect(refusal(() => checkFinalizable(record(running, open, { requests: { finalize: 1 } })))).toBe('OK');
    expect(refusal(() => checkFinalizable(record(running, {})))).toBe('TRANSFER_NOT_ACTIVE');
    expect(refusal(() => checkFinalizable(record(pb.OperationStatus.OPERATION_STATUS_FAILED, open)))).toBe('TRANSFER_NOT_ACTIVE');
    expect(refusal(() => checkFinalizable(record(running, open, { cancelRequested: true })))).toBe('TRANSFER_NOT_ACTIVE');
    const other = record(running, open);
    other.op.type = pb.OperationType.OPERATION_TYPE_EXTEND_DISK;
    expect(refusal(() => checkFinalizable(other))).toBe('NOT_A_TRANSFER');
  });

  it('is finalized or cancelled only by the user who started it or an admin', () => {
    const t = record(running, open);
    for (const action of ['finalize', 'cancel'] as const) {
      expect(refusal(() => checkTransferController(t, { uri: 'sdmesh://user/alice', admin: false }, action))).toBe('OK');
      expect(refusal(() => checkTransferController(t, { uri: 'sdmesh://user/root', admin: true }, action))).toBe('OK');
      expect(refusal(() => checkTransferController(t, { uri: 'sdmesh://user/bob', admin: false }, action))).toBe('NOT_TRANSFER_OWNER');
    }
    let denied: unknown;
    try {
      checkTransferController(t, { uri: 'sdmesh://user/bob', admin: false }, 'cancel');
    } catch (err) {
      denied = err;
    }
    expect(denied).toMatchObject({ code: GrpcStatus.PERMISSION_DENIED });
    expect((denied as SdmeshError).message).toMatch(
      /only the user who started operations\/abc \(sdmesh:\/\/user\/alice\) or an admin may cancel it, not sdmesh:\/\/user\/bob/,
    );
    // Started without TLS (no owner): without TLS anyone (every caller is ''), with TLS an admin only.
    const anonymous = record(running, open, { params: { ...params, owner: '' } });
    expect(refusal(() => checkTransferController(anonymous, { uri: '', admin: false }, 'finalize'))).toBe('OK');
    expect(refusal(() => checkTransferController(anonymous, { uri: 'sdmesh://user/alice', admin: false }, 'finalize'))).toBe('NOT_TRANSFER_OWNER');
    expect(refusal(() => checkTransferController(anonymous, { uri: 'sdmesh://user/root', admin: true }, 'finalize'))).toBe('OK');
  });
});

describe("the transfer step (the endpoint's counters, read every second)", () => {
  type Answer = Partial<pb.TransferState> | Error;
  /** Runs the step against a host whose GetTransfer answers `answers` in turn (the last one repeated). */
  async function follow(answers: Answer[], opts: { finalize?: boolean; healthy?: boolean; expiresAtMs?: number } = {}) {
    const progress: pb.Progress[] = [];
    let i = 0;
    const host = {
      healthy: opts.healthy ?? true,
      clients: {
        mover: {
          getTransfer: async () => {
            const a = answers[Math.min(i++, answers.length - 1)]!;
            if (a instanceof Error) throw a;
            return pb.TransferState.fromPartial(a);
          },
        },
      },
    };
    const env = { cluster: { hosts: { get: () => host } } } as unknown as RunEnv;
    const ctx = {
      rec: { params },
      signal: new AbortController().signal,
      requested: async () => !!opts.finalize && progress.length > 0,
    } as unknown as FlowContext<ImageTransferParams>;
    const run: StepRun = { attempt: 1, setHost: async () => undefined, progress: async (p) => void progress.push(p) };
    try {
      await followTransfer(env, ctx, run, { host: 'host1', url: 'u' }, opts.expiresAtMs ?? Date.now() + 3_600_000);
      return { outcome: 'finalized', progress };
    } catch (err) {
      return { outcome: SdmeshError.from(err).reason, progress };
    }
  }

  it('reports bytes of the ticket size as progress until a finalize is requested', async () => {
    const r = await follow([{ active: true, bytesWritten: 262144, idleMs: 10 }], { finalize: true });
    expect(r.outcome).toBe('finalized');
    expect(r.progress[0]).toMatchObject({ bytesDone: 262144, bytesTotal: 1 << 20, percent: 25 });
  });

  it.each([
    ['no request for longer than the inactivity timeout', [{ active: true, idleMs: 60_001 }], {}, 'TRANSFER_IDLE'],
    ['the maximum duration', [{ active: true }], { expiresAtMs: Date.now() - 1 }, 'TRANSFER_EXPIRED'],
    ['a failed export', [{ active: false, failed: 'qemu-nbd exited' }], {}, 'TRANSFER_FAILED'],
    ['a data-mover that forgot the ticket (restarted)', [fail(Reason.TRANSFER_NOT_FOUND, 'no such transfer')], {}, 'TRANSFER_HOST_LOST'],
    ['a host that stops answering while the poll calls it down', [unavailable('connection refused')], { healthy: false }, 'TRANSFER_HOST_LOST'],
    ['a refusal that is not about the host', [fail(Reason.INVALID_ID, 'bad ticket')], {}, 'INVALID_ID'],
  ] as const)('fails on %s', async (_what, answers, opts, reason) => {
    expect((await follow([...answers], opts)).outcome).toBe(reason);
  });

  it('keeps a transfer through a missed answer of a host the poll still calls healthy', async () => {
    const r = await follow([unavailable('timeout'), { active: true, bytesWritten: 1 << 20, idleMs: 0 }], { finalize: true, healthy: true });
    expect(r.outcome).toBe('finalized');
    expect(r.progress.map((p) => p.bytesDone)).toEqual([1 << 20]);
  });
});

import { Metadata, status, type Client, type ServiceError } from '@grpc/grpc-js';
import {
  Authorizer,
  checkHealth,
  createClient,
  createLogger,
  findUnsafeInteger,
  GrpcServer,
  MeshTls,
  pb,
  service,
  type ServiceHandlers,
} from '@sdmesh/common/internal';
import { LocalPki } from '@sdmesh/localmesh';
import { runCli } from '@sdmesh/sdmctl';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * 64-bit integers that a JavaScript number cannot hold (beyond ±(2^53 − 1)) are the caller's
 * mistake: INVALID_ARGUMENT naming the field, never `INTERNAL: Error deserializing request`.
 * Real gRPC with mTLS; the request bytes are written by hand (no client library would encode
 * such a number from a JavaScript number).
 */

/** Protobuf varint of an unsigned 64-bit value. */
function varint(v: bigint): number[] {
  const out: number[] = [];
  let x = BigInt.asUintN(64, v);
  do {
    let b = Number(x & 0x7fn);
    x >>= 7n;
    if (x) b |= 0x80;
    out.push(b);
  } while (x);
  return out;
}
const field = (num: number, v: bigint) => [...varint(BigInt((num << 3) | 0)), ...varint(v)];
const lengthDelimited = (num: number, bytes: number[] | Buffer) => [...varint(BigInt((num << 3) | 2)), ...varint(BigInt(bytes.length)), ...bytes];

const DOMAIN = '/var/lib/sdmesh/storage/d';
const base = (): number[] => [
  ...pb.CreateVolumeRequest.encode(pb.CreateVolumeRequest.fromPartial({ domainPath: DOMAIN, imageId: 'i', volumeId: 'v' })).finish(),
];

function rawCall(client: Client, path: string, bytes: number[]): Promise<{ code: number; details: string; reason?: string }> {
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      path,
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.from(bytes),
      new Metadata(),
      { deadline: Date.now() + 5000 },
      (err: ServiceError | null) => {
        if (!err) return resolve({ code: status.OK, details: '' });
        const reason = err.metadata?.get('sdmesh-reason')[0];
        resolve({ code: err.code, details: err.details, reason: typeof reason === 'string' ? reason : undefined });
      },
    );
  });
}

describe('64-bit integers in requests', () => {
  const dir = makeTestDir('int64');
  const pki = new LocalPki(dir);
  const serverTls = MeshTls.fromFiles(pki.forIdentity({ kind: 'host', host: 'h1', service: 'metadata-tx' }));
  const scheduler = MeshTls.fromFiles(pki.forIdentity({ kind: 'scheduler' })).channelCredentials();
  const stranger = MeshTls.fromFiles(pki.forIdentity({ kind: 'host', host: 'h2', service: 'gc' })).channelCredentials();
  const received: pb.CreateVolumeRequest[] = [];
  const notHere = async (): Promise<never> => {
    throw new Error('not in this test');
  };
  // Every method refuses except CreateVolume, the one under test (new methods need no edit here).
  const handlers = {
    ...Object.fromEntries(Object.keys(pb.MetadataTxServiceDefinition.methods).map((name) => [name, notHere])),
    createVolume: async (req: pb.CreateVolumeRequest) => {
      received.push(req);
      return { volumeId: req.volumeId, capacityBytes: req.capacityBytes };
    },
  } as unknown as ServiceHandlers<typeof pb.MetadataTxServiceDefinition>;
  const server = new GrpcServer({
    serviceName: 'metadata-tx',
    host: '127.0.0.1',
    port: 0,
    log: createLogger('test', 'silent'),
    tls: serverTls,
    authorizer: new Authorizer({ insecure: false }),
    services: [service(pb.MetadataTxServiceDefinition, handlers)],
  });
  let address: string;
  const PATH = '/sdmesh.v1.MetadataTxService/CreateVolume';

  beforeAll(async () => {
    address = `127.0.0.1:${await server.start()}`;
  });
  afterAll(async () => {
    await server.shutdown(1000);
    removeTestDir(dir);
  });

  it('a value that fits passes; 2^53, 2^63 − 1 and −2^60 are INVALID_ARGUMENT naming capacity_bytes; the handler never sees them', async () => {
    const api = createClient(pb.MetadataTxServiceDefinition, address, scheduler);
    try {
      const ok = await rawCall(api.client, PATH, [...base(), ...field(7, BigInt(Number.MAX_SAFE_INTEGER))]);
      expect(ok.code).toBe(status.OK);
      expect(received.map((r) => r.capacityBytes)).toEqual([Number.MAX_SAFE_INTEGER]);
      for (const [v, shown] of [
        [2n ** 53n, '9007199254740992'],
        [2n ** 63n - 1n, '9223372036854775807'],
        [-(2n ** 60n), '-1152921504606846976'],
      ] as const) {
        const r = await rawCall(api.client, PATH, [...base(), ...field(7, v)]);
        expect(r).toEqual({
          code: status.INVALID_ARGUMENT,
          reason: 'VALUE_OUT_OF_RANGE',
          details: expect.stringContaining(`capacity_bytes ${shown} is out of range`),
        });
      }
      expect(received).toHaveLength(1);
      // Bytes that are no message at all: INVALID_ARGUMENT too, not INTERNAL.
      const junk = await rawCall(api.client, PATH, [0x0a, 0x7f, 0x01]);
      expect(junk.code).toBe(status.INVALID_ARGUMENT);
      expect(junk.reason).toBe('MALFORMED_REQUEST');
      expect(await checkHealth(address, scheduler)).toBe('SERVING');
    } finally {
      api.close();
    }
  });

  it('authorization comes first: a caller the table refuses learns nothing about its request', async () => {
    const api = createClient(pb.MetadataTxServiceDefinition, address, stranger);
    try {
      const r = await rawCall(api.client, PATH, [...base(), ...field(7, 2n ** 60n)]);
      expect(r.code).toBe(status.PERMISSION_DENIED);
    } finally {
      api.close();
    }
  });

  it('names nested and repeated fields (leases[1].offset), zigzag-free int64 as sent', () => {
    const location = (offset: bigint) => lengthDelimited(3, [...lengthDelimited(1, Buffer.from('ls')), ...field(4, offset)]);
    const bytes = Uint8Array.from([...lengthDelimited(1, Buffer.from('ls')), ...location(1048576n), ...location(2n ** 62n)]);
    expect(findUnsafeInteger('/sdmesh.v1.LeaseManagerService/FormatLeases', bytes)).toEqual({ field: 'leases[1].offset', value: 2n ** 62n });
    expect(findUnsafeInteger('/sdmesh.v1.LeaseManagerService/FormatLeases', Uint8Array.from(location(4096n)))).toBeUndefined();
    expect(() => pb.FormatLeasesRequest.decode(bytes)).toThrow(/MAX_SAFE_INTEGER/);
  });

  it('sdmctl refuses such a size itself with exit code 2 (usage), naming the flag', async () => {
    let err = '';
    const code = await runCli(
      ['disks', 'create', '--domain', 'gold', '--size', '9007199254740993', '--address', '127.0.0.1:1', '--insecure'],
      {},
      {
        out: { write: () => undefined },
        err: { write: (t) => void (err += t) },
        tty: false,
        signal: new AbortController().signal,
      },
    );
    expect(code).toBe(2);
    expect(err).toMatch(/--size: "9007199254740993" is too large/);
  });
});

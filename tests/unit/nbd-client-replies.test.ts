import net from 'node:net';
import path from 'node:path';
import { NbdClient, NbdError } from '@sdmesh/common';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The NBD client against a server that answers reads wrongly (a buggy or hostile one): a read is
 * refused unless its reply fills every byte of the buffer exactly once, so no uninitialised
 * memory ever reaches a caller. The server speaks just enough NBD for that (fixed newstyle,
 * structured replies, GO); the well-behaved protocol is tested against qemu-nbd in nbd-client.test.ts.
 */

const dir = makeTestDir('nbd-client-replies');
afterAll(() => removeTestDir(dir));

const SIZE = 1024 * 1024;
type ReadAnswer = (cookie: bigint, offset: number, length: number) => Buffer[];

/** A one-export NBD server whose read replies `answer` makes. */
async function fakeServer(name: string, answer: ReadAnswer): Promise<{ socket: string; close(): void }> {
  const socket = path.join(dir, `${name}.sock`);
  const server = net.createServer((c) => {
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(0x4e42444d41474943n, 0);
    hello.writeBigUInt64BE(0x49484156454f5054n, 8);
    hello.writeUInt16BE(1 | 2, 16); // fixed newstyle, no zeroes
    c.write(hello);
    const optReply = (option: number, type: number, payload = Buffer.alloc(0)) => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(0x3e889045565a9n, 0);
      h.writeUInt32BE(option, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(payload.length, 16);
      c.write(Buffer.concat([h, payload]));
    };
    c.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16 || buf.length < 16 + buf.readUInt32BE(12)) return;
          const option = buf.readUInt32BE(8);
          buf = buf.subarray(16 + buf.readUInt32BE(12));
          if (option === 7) {
            const info = Buffer.alloc(12); // INFO_EXPORT: size, transmission flags
            info.writeUInt16BE(0, 0);
            info.writeBigUInt64BE(BigInt(SIZE), 2);
            info.writeUInt16BE(1, 10);
            optReply(option, 3, info);
            phase = 'transmission';
          }
          optReply(option, 1);
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const cookie = buf.readBigUInt64BE(8);
          const offset = Number(buf.readBigUInt64BE(16));
          const length = buf.readUInt32BE(24);
          buf = buf.subarray(28);
          if (type === 0) for (const b of answer(cookie, offset, length)) c.write(b);
        }
      }
    });
    c.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  return { socket, close: () => server.close() };
}

const simpleReply = (cookie: bigint) => {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(0x67446698, 0);
  b.writeBigUInt64BE(cookie, 8);
  return b;
};

const dataChunk = (cookie: bigint, offset: number, data: Buffer, done: boolean) => {
  const b = Buffer.alloc(20 + 8);
  b.writeUInt32BE(0x668e33ef, 0);
  b.writeUInt16BE(done ? 1 : 0, 4);
  b.writeUInt16BE(1, 6); // OFFSET_DATA
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(8 + data.length, 16);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return Buffer.concat([b, data]);
};

async function readFrom(name: string, answer: ReadAnswer): Promise<Buffer | Error> {
  const server = await fakeServer(name, answer);
  const nbd = await NbdClient.connect(server.socket);
  try {
    return await nbd.read(0, 4096).catch((err: Error) => err);
  } finally {
    await nbd.close().catch(() => undefined);
    server.close();
  }
}

describe('NbdClient read replies', () => {
  test('a well-formed reply in two chunks reads back', async () => {
    const data = Buffer.alloc(4096, 7);
    const got = await readFrom('good', (cookie, offset) => [
      dataChunk(cookie, offset + 2048, data.subarray(2048), false),
      dataChunk(cookie, offset, data.subarray(0, 2048), true),
    ]);
    expect(got).toEqual(data);
  });

  test('a simple reply (no data) to a read is refused, not a buffer of whatever memory held', async () => {
    const got = await readFrom('simple', (cookie) => [simpleReply(cookie)]);
    expect(got).toBeInstanceOf(NbdError);
  });

  test('overlapping chunks that add up to the length but leave bytes unwritten are refused', async () => {
    const half = Buffer.alloc(2048, 9);
    const got = await readFrom('overlap', (cookie, offset) => [dataChunk(cookie, offset, half, false), dataChunk(cookie, offset, half, true)]);
    expect(got).toBeInstanceOf(NbdError);
    expect((got as Error).message).toMatch(/covered/);
  });
});

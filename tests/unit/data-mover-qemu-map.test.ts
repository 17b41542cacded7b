import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { open } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { FIRST_CHILD_FD, imageSpec, Reason, SdmeshError } from '@sdmesh/common';
import { dataBytes, MAP_MAX_LINE, parseQemuMap, qemuImgMap, type MapExtent } from '../../services/data-mover/src/qemu';

/**
 * The copy worker reads `qemu-img map --output=json` as it arrives (services/data-mover/src/qemu.ts,
 * QemuMapParser): a fragmented image's map has millions of extents, and the worker's memory must not
 * grow with them. The parser is strict: the map describes hostile storage.
 */
jest.setTimeout(120_000);

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;
const heapAfterGc = () => {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
};

const EXTENT = (i: number) =>
  i % 2 === 0
    ? `{ "start": ${i * 65536}, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": ${327680 + (i / 2) * 65536}}`
    : `{ "start": ${i * 65536}, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false}`;

/** A map of `count` alternating data/zero extents as qemu-img prints it, produced lazily in ~64 KiB chunks. */
function syntheticMap(count: number): Readable {
  return Readable.from(
    (function* () {
      let chunk = '[';
      for (let i = 0; i < count; i++) {
        chunk += EXTENT(i) + (i === count - 1 ? ']\n' : ',\n');
        if (chunk.length >= 65536) {
          yield chunk;
          chunk = '';
        }
      }
      if (chunk) yield chunk;
    })(),
  );
}

async function parseAll(text: string | string[]): Promise<MapExtent[]> {
  const out: MapExtent[] = [];
  for await (const e of parseQemuMap(Readable.from(Array.isArray(text) ? text : [text]))) out.push(e);
  return out;
}

async function parseError(text: string | string[]): Promise<SdmeshError> {
  const err = await parseAll(text).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SdmeshError);
  expect((err as SdmeshError).reason).toBe(Reason.QEMU_IMG_FAILED);
  return err as SdmeshError;
}

describe('qemu-img map parser', () => {
  it('parses a million extents one at a time: the heap does not grow with them', async () => {
    const COUNT = 1_000_000;
    // What holding extents costs here: keep 100 000 of them and weigh them.
    const base = heapAfterGc();
    const kept: MapExtent[] = [];
    for await (const e of parseQemuMap(syntheticMap(100_000))) kept.push(e);
    const perExtent = (heapAfterGc() - base) / kept.length;
    expect(kept).toHaveLength(100_000);
    kept.length = 0;

    const before = heapAfterGc();
    let count = 0;
    let next = 0;
    let data = 0;
    let maxGrowth = 0;
    for await (const e of parseQemuMap(syntheticMap(COUNT))) {
      expect(e.start).toBe(next);
      next += e.length;
      if (e.data) data += e.length;
      if (++count % 100_000 === 0) maxGrowth = Math.max(maxGrowth, heapAfterGc() - before);
    }
    expect(count).toBe(COUNT);
    expect(next).toBe(COUNT * 65536);
    expect(data).toBe((COUNT / 2) * 65536);
    // Holding them all would take perExtent * COUNT (≈ 100 MB); the parser holds one chunk's worth.
    expect(perExtent).toBeGreaterThan(40);
    expect(maxGrowth).toBeLessThan((perExtent * COUNT) / 20);
    expect(await dataBytes(parseQemuMap(syntheticMap(10_001)))).toBe(5001 * 65536);
  });

  it('parses the map whatever the chunking: lines split anywhere, an empty map, the fields qemu-img prints', async () => {
    const text = `[${EXTENT(0)},\n${EXTENT(1)},\n{ "start": 131072, "length": 512, "depth": 1, "present": true, "zero": false, "data": true, "compressed": false, "offset": 0}]\n`;
    const whole = await parseAll(text);
    expect(whole).toEqual([
      { start: 0, length: 65536, depth: 0, present: true, zero: false, data: true, offset: 327680 },
      { start: 65536, length: 65536, depth: 0, present: false, zero: true, data: false },
      { start: 131072, length: 512, depth: 1, present: true, zero: false, data: true, compressed: false, offset: 0 },
    ]);
    expect(await parseAll(text.split(''))).toEqual(whole);
    expect(await parseAll('[]\n')).toEqual([]);
  });

  it('refuses anything that is not a whole map, naming the line', async () => {
    const good = `[${EXTENT(0)},\n${EXTENT(1)}]\n`;
    expect((await parseError('')).message).toMatch(/ended empty/);
    expect((await parseError(`[${EXTENT(0)},\n`)).message).toMatch(/line 1: output ended before the closing "\]" \(truncated\)/);
    expect((await parseError(good.slice(0, -20))).message).toMatch(/line 2: output ended within a line \(truncated\)/);
    expect((await parseError(good.slice(0, -1))).message).toMatch(/within a line/);
    expect((await parseError(`${EXTENT(0)}]\n`)).message).toMatch(/line 1: the map does not start with "\["/);
    expect((await parseError(`${good}[]\n`)).message).toMatch(/line 3: text after the closing "\]"/);
    expect((await parseError(`[${EXTENT(0)}\n`)).message).toMatch(/line 1: an extent line must end with/);
    expect((await parseError(`[{ "start": 0, "length": 1,, }]\n`)).message).toMatch(/line 1: an extent that is not a JSON object/);
    expect((await parseError(`[{}]\n`)).message).toMatch(/line 1: no "start"/);
    // A line without end is refused once it is longer than a line can be, not buffered.
    const endless = Array.from({ length: 100 }, () => ' '.repeat(1000));
    expect((await parseError(['[', ...endless])).message).toMatch(new RegExp(`line 1: a line longer than ${MAP_MAX_LINE}`));
    expect((await parseError(`[{ "start": 0, ${' '.repeat(MAP_MAX_LINE)}"length": 1}]\n`)).message).toMatch(/longer than/);

    const extent = (fields: string) => parseError(`[${EXTENT(0)},\n{ ${fields} }]\n`);
    const base = '"start": 65536, "length": 65536, "depth": 0, "zero": true, "data": false';
    expect((await extent(base.replace('65536,', '-1,'))).message).toMatch(/line 2: "start" is not a byte count \(-1\)/);
    expect((await extent(base.replace('"length": 65536', '"length": 1.5'))).message).toMatch(/"length" is not a byte count \(1.5\)/);
    expect((await extent(base.replace('"length": 65536', '"length": "65536"'))).message).toMatch(/"length" is not a byte count \("65536"\)/);
    expect((await extent(base.replace('"length": 65536', '"length": 1e300'))).message).toMatch(/"length" is not a byte count/);
    expect((await extent(base.replace('"length": 65536', '"length": 0'))).message).toMatch(/an empty extent/);
    expect((await extent(base.replace('"start": 65536', '"start": 9007199254740000'))).message).toMatch(/past the largest image size/);
    expect((await extent(`${base}, "offset": -512`)).message).toMatch(/"offset" is not a byte count/);
    expect((await extent(base.replace('"zero": true', '"zero": 1'))).message).toMatch(/"zero" is not true or false/);
    expect((await extent(base.replace(', "depth": 0', ''))).message).toMatch(/line 2: no "depth"/);
    expect((await extent(`${base}, "filename": "/etc/passwd"`)).message).toMatch(/an unknown field "filename"/);
    expect((await extent(`${base}, "__proto__": {}`)).message).toMatch(/an unknown field "__proto__"/);
  });
});

describe('qemu-img map of an image (real qemu-img)', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-qemu-map-'));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A qcow2 of `clusters` 512-byte clusters, every other one data (the others unallocated: zeros). */
  function fragmented(name: string, clusters: number): string {
    const raw = path.join(dir, `${name}.raw`);
    const pair = Buffer.concat([Buffer.alloc(512, 0xab), Buffer.alloc(512)]);
    fs.writeFileSync(raw, Buffer.concat(Array.from({ length: clusters / 2 }, () => pair)));
    const file = path.join(dir, name);
    execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', '-S', '512', raw, file]);
    return file;
  }

  async function mapOf(file: string, signal?: AbortSignal): Promise<MapExtent[]> {
    const handle = await open(file, 'r');
    try {
      const out: MapExtent[] = [];
      for await (const e of qemuImgMap(imageSpec([{ fd: FIRST_CHILD_FD, format: 'QCOW2' }]), 'QCOW2', [handle], signal)) out.push(e);
      return out;
    } finally {
      await handle.close();
    }
  }

  const qemuImgChildren = () =>
    fs
      .readdirSync('/proc/self/task')
      .flatMap((t) => fs.readFileSync(`/proc/self/task/${t}/children`, 'utf8').trim().split(/\s+/))
      .filter((pid) => pid && fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('qemu-img'));

  it('streams the same extents qemu-img prints, and stops qemu-img when the reader stops', async () => {
    const file = fragmented('frag.qcow2', 4000);
    const expected = JSON.parse(execFileSync('qemu-img', ['map', '-f', 'qcow2', '--output=json', file], { encoding: 'utf8' })) as MapExtent[];
    expect(expected).toHaveLength(4000);
    expect(await mapOf(file)).toEqual(expected);

    const handle = await open(file, 'r');
    try {
      for await (const e of qemuImgMap(imageSpec([{ fd: FIRST_CHILD_FD, format: 'QCOW2' }]), 'QCOW2', [handle])) {
        expect(e).toEqual(expected[0]);
        break;
      }
      expect(qemuImgChildren()).toEqual([]);
    } finally {
      await handle.close();
    }
  });

  it("fails with qemu-img's message on an image it cannot read, and ABORTED when aborted", async () => {
    const notQcow2 = path.join(dir, 'not-qcow2');
    fs.writeFileSync(notQcow2, Buffer.alloc(4096, 7));
    const err = await mapOf(notQcow2).then(
      () => undefined,
      (e: unknown) => e as SdmeshError,
    );
    expect(err).toBeInstanceOf(SdmeshError);
    expect(err!.reason).toBe(Reason.QEMU_IMG_FAILED);
    expect(err!.message).toMatch(/^qemu-img map failed: .*qcow2/i);

    const abort = new AbortController();
    abort.abort();
    await expect(mapOf(path.join(dir, 'frag.qcow2'), abort.signal)).rejects.toMatchObject({ message: expect.stringMatching(/cancelled|abort/i) });
  });
});

import { pb } from '@sdmesh/common';
import { COMMANDS, formatEvent, parseSize, ProgressView, runCli } from '@sdmesh/sdmctl';

async function run(argv: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runCli(argv, env, {
    out: { write: (t) => void (out += t) },
    err: { write: (t) => void (err += t) },
    tty: false,
    signal: new AbortController().signal,
  });
  return { code, out, err };
}

describe('sdmctl command line', () => {
  it('has --help with examples on every command, and overviews', async () => {
    for (const c of COMMANDS) {
      const { code, out } = await run([...c.path, '--help']);
      expect({ cmd: c.path.join(' '), code }).toEqual({ cmd: c.path.join(' '), code: 0 });
      expect(out).toContain(`Usage: sdmctl ${c.path.join(' ')}`);
      expect(out).toContain('Examples:\n  sdmctl ');
      expect(out).toContain('--address HOST:PORT');
    }
    const top = await run(['--help']);
    expect(top.code).toBe(0);
    expect(top.out).toContain('Exit codes:');
    expect((await run([])).code).toBe(2);
    const group = await run(['disk']);
    expect(group.code).toBe(2);
    expect(group.out).toContain('disks move');
  });

  it('usage errors exit 2 with one line and no stack', async () => {
    const cases: Array<[string[], RegExp]> = [
      [['frobnicate'], /unknown command "frobnicate"/],
      [['disks', 'get'], /missing DISK/],
      [['disks', 'get', 'x', 'y'], /unexpected argument "y"/],
      [['disks', 'list', '--colour'], /unknown flag --colour for "disks list"/],
      [['disks', 'create', '--domain', 'gold'], /missing --size/],
      [['disks', 'create', '--domain', 'gold', '--size', 'big'], /--size: "big" is not a size/],
      [['disks', 'create', '--size', '1G', '--format', 'vmdk'], /--format: "vmdk" is not one of raw, qcow2/],
      [['disks', 'get', 'not-a-uuid', '-d', 'gold'], /DISK "not-a-uuid" is not a disk id/],
      [['hosts', 'list'], /no scheduler address: pass --address HOST:PORT or set SDMESH_ADDRESS/],
      [['hosts', 'list', '--address', 'nonsense'], /--address "nonsense" is not HOST:PORT/],
      [['hosts', 'list', '--address', '127.0.0.1:1', '--tls-cert', '/x'], /sdmesh needs mutual TLS: give --tls-ca, --tls-cert and --tls-key/],
      [
        ['hosts', 'list', '--address', '127.0.0.1:1', '--tls-ca', '/nonexistent/ca.pem', '--tls-cert', '/x', '--tls-key', '/y'],
        /--tls-ca \/nonexistent\/ca.pem: ENOENT/,
      ],
      [['ops', 'get', 'operations/xyz', '--address', '127.0.0.1:1', '--insecure'], /"operations\/xyz" is not an operation/],
      [['events'], /no NATS server/],
      [['check'], /missing DOMAIN_PATH/],
    ];
    for (const [argv, message] of cases) {
      const r = await run(argv);
      expect({ argv, code: r.code }).toEqual({ argv, code: 2 });
      expect(r.err).toMatch(message);
      // one line of error (after the --insecure warning where the case talks plaintext)
      const lines = r.err.trim().split('\n');
      expect(lines.filter((l) => !l.startsWith('sdmctl: WARNING: --insecure'))).toHaveLength(1);
      expect(lines.length).toBe(argv.includes('--insecure') ? 2 : 1);
      expect(r.out).toBe('');
    }
  });

  it('flags anywhere, = or space, --no-x, env defaults; an unreachable server exits 3', async () => {
    const r = await run(['-o', 'json', 'hosts', 'list', '--call-timeout=2'], { SDMESH_ADDRESS: '127.0.0.1:1', SDMESH_INSECURE: 'true' });
    expect(r.code).toBe(3);
    // the plaintext opt-out is said first, loudly; then the one-line error
    expect(r.err).toMatch(
      /^sdmctl: WARNING: --insecure: plaintext to 127\.0\.0\.1:1, no certificate.*\nsdmctl: cannot reach the scheduler at 127\.0\.0\.1:1: .*\[(UNAVAILABLE|DEADLINE_EXCEEDED)\]\n$/,
    );
    expect(r.err).not.toContain('    at ');
    const noWait = await run(['disks', 'create', '--no-wait', '--size', '1G', '-d', 'gold', '--address', '127.0.0.1:1', '--call-timeout', '2', '--insecure']);
    expect(noWait.code).toBe(3);
    expect((await run(['hosts', 'list', '--call-timeout', 'soon'])).err).toContain('--call-timeout: expected a whole number');
  });

  it('parses sizes in binary units', () => {
    expect(parseSize('1G')).toBe(1024 ** 3);
    expect(parseSize('512MiB')).toBe(512 * 1024 ** 2);
    expect(parseSize('1.5k')).toBe(1536);
    expect(parseSize('4096')).toBe(4096);
    expect(() => parseSize('0')).toThrow(/not a positive/);
  });

  it('formats events as one readable line', () => {
    const time = new Date(2024, 0, 2, 3, 4, 5, 6);
    const line = formatEvent(
      pb.Event.fromPartial({
        time,
        sourceHost: 'host2',
        sourceService: 'data-mover',
        payload: {
          $case: 'job',
          job: {
            kind: pb.JobEvent_Kind.KIND_PROGRESS,
            jobId: 'abcdef12-0000-4000-8000-000000000000',
            progress: { percent: 42, bytesTotal: 1024 ** 3, mbps: 88.5 },
          },
        },
      }),
    );
    expect(line).toBe('03:04:05.006  host2/data-mover         job       PROGRESS job abcdef12 42% of 1 GiB 88.5 MB/s');
    const op = formatEvent(
      pb.Event.fromPartial({
        time,
        sourceHost: 'scheduler-1',
        sourceService: 'scheduler',
        payload: {
          $case: 'operation',
          operation: {
            operationName: 'operations/x',
            status: pb.OperationStatus.OPERATION_STATUS_FAILED,
            step: 'copy-volume:abcdef12-0000-4000-8000-000000000000',
            host: 'host1',
            error: { message: 'disk full', reason: 'NO_SPACE' },
          },
        },
      }),
    );
    expect(op).toContain('operation FAILED operations/x step copy-volume:abcdef12 on host1 error="disk full" [NO_SPACE]');
    const fenced = formatEvent(
      pb.Event.fromPartial({
        time,
        sourceHost: 'scheduler-1',
        sourceService: 'scheduler',
        payload: {
          $case: 'diskAttachment',
          diskAttachment: {
            kind: pb.DiskAttachmentEvent_Kind.KIND_FENCED,
            storageDomainId: 'd0d0d0d0-0000-4000-8000-000000000000',
            diskId: 'abcdef12-0000-4000-8000-000000000000',
            host: 'host2',
            generation: 4,
          },
        },
      }),
    );
    expect(fenced).toContain('FENCED disk abcdef12 domain d0d0d0d0 host host2 gen 4');
  });

  it('draws a progress bar with step, host, percent and MB/s, and a line per finished step', () => {
    let text = '';
    const view = new ProgressView((t) => (text += t), 10);
    const S = pb.OperationStatus;
    view.update(
      pb.Operation.fromPartial({
        name: 'operations/x',
        status: S.OPERATION_STATUS_RUNNING,
        currentStep: 'copy-volume:abcdef12-0000-4000-8000-000000000000',
        steps: [
          { name: 'create-target', status: S.OPERATION_STATUS_DONE, host: 'host1', startTime: new Date(1000), endTime: new Date(1400) },
          {
            name: 'copy-volume:abcdef12-0000-4000-8000-000000000000',
            status: S.OPERATION_STATUS_RUNNING,
            host: 'host3',
            progress: { percent: 50, bytesDone: 512 * 1024 ** 2, bytesTotal: 1024 ** 3, mbps: 120.25 },
          },
        ],
      }),
    );
    expect(text).toContain('  ✓ create-target on host1  400 ms\n');
    expect(text).toContain('  ▸ copy-volume:abcdef12 on host3 [█████░░░░░]  50%  512 MiB / 1 GiB  120.3 MB/s');
    view.finish();
    expect(text.endsWith('\r\x1b[2K')).toBe(true);
  });
});

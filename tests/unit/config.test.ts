import { commonOptions, ConfigError, HelpRequested, parseConfig } from '@sdmesh/common/internal';

const spec = {
  ...commonOptions,
  hostId: { type: 'int', description: 'host id', min: 1, max: 2000, default: 1 },
  mode: { type: 'enum', description: 'mode', choices: ['sdm', 'spm'], default: 'sdm' },
  verbose: { type: 'bool', description: 'verbose' },
} as const;

describe('parseConfig', () => {
  const env = { SDMESH_NATS_URL: 'nats://127.0.0.1:4999' };

  it('takes flags over env over defaults', () => {
    const c = parseConfig(spec, ['--grpc-port', '5000', '--mode=spm', '--verbose'], { ...env, SDMESH_GRPC_PORT: '6000', SDMESH_HOST_ID: '7' });
    expect(c.grpcPort).toBe(5000);
    expect(c.hostId).toBe(7);
    expect(c.mode).toBe('spm');
    expect(c.verbose).toBe(true);
    expect(c.natsUrl).toBe('nats://127.0.0.1:4999');
    expect(c.logLevel).toBe('info');
  });

  it('takes the URLs of several NATS nodes, comma-separated', () => {
    expect(parseConfig(spec, ['--nats-url', 'nats://a:4222, nats://b:4222,nats://c:4222'], {}).natsUrl).toBe('nats://a:4222,nats://b:4222,nats://c:4222');
  });

  it.each([
    [['--grpc-port', '70000'], /--grpc-port \(port\): 70000 is out of range 0..65535/],
    [['--grpc-port', 'abc'], /expected a whole number, got "abc"/],
    [['--nope'], /unknown option --nope/],
    [['stray'], /unexpected argument "stray"/],
    [['--mode', 'xyz'], /"xyz" is not one of sdm, spm/],
    [['--host-id', '0'], /out of range 1..2000/],
    [['--nats-url', 'not a url'], /is not a URL/],
    [['--nats-url', 'nats://a:4222,not a url'], /--nats-url \(url\): "not a url" is not a URL/],
    [['--nats-url', ' , '], /expected one or more comma-separated URLs/],
    [['--grpc-port'], /needs a value/],
  ])('refuses %j with a one-line message', (argv, message) => {
    let err: unknown;
    try {
      parseConfig(spec, argv, env);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).not.toContain('\n');
  });

  it('requires the NATS URL', () => {
    expect(() => parseConfig(spec, [], {})).toThrow(/missing required option --nats-url \(or SDMESH_NATS_URL\)/);
  });

  it('validates values that come from the environment too', () => {
    expect(() => parseConfig(spec, [], { ...env, SDMESH_METRICS_PORT: '-1' })).toThrow(/SDMESH_METRICS_PORT \(port\): -1 is out of range/);
  });

  it('answers --help with every option and its variable', () => {
    let help = '';
    try {
      parseConfig(spec, ['--help'], {}, 'sdmesh-test', 'A test service.');
    } catch (e) {
      help = (e as HelpRequested).text;
    }
    expect(help).toContain('Usage: sdmesh-test [options]');
    expect(help).toContain('--grpc-port <port>');
    expect(help).toContain('SDMESH_HOST_ID');
    expect(help).toContain('(required)');
  });
});

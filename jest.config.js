/** Two projects: `unit` (fast, no daemons) and `integration` (real sanlock, nats-server, qemu-img). */
const moduleNameMapper = {
  '^@sdmesh/common$': '<rootDir>/packages/common/src/index.ts',
  '^@sdmesh/common/internal$': '<rootDir>/packages/common/src/internal.ts',
  '^@sdmesh/common/worker$': '<rootDir>/packages/common/src/worker.ts',
  '^@sdmesh/sanlock$': '<rootDir>/packages/sanlock/src/index.ts',
  '^@sdmesh/localmesh$': '<rootDir>/packages/localmesh/src/index.ts',
  '^@sdmesh/sdmctl$': '<rootDir>/packages/sdmctl/src/index.ts',
};
// Type checking is done once by `npm run typecheck`; tests only transpile.
const transform = { '^.+\\.ts$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.jest.json', diagnostics: false }] };
// Not source: the Node toolchain (its package.json has the name of scripts/toolchain's) and the
// local mesh's and image build's work files (copies of the workspace package.json files).
const modulePathIgnorePatterns = ['<rootDir>/.toolchain/', '<rootDir>/.sdmesh/'];
module.exports = {
  // Two test files at a time: the integration tests spend most of their time waiting on sanlock's
  // timeouts and real daemons, not on the CPU, so two in parallel halve the suite's wall time on
  // two cores. freePort gives each worker its own port slice.
  maxWorkers: 2,
  // Unit tests that run real qemu-img or a fake cluster must not fail on a busy machine (the
  // integration project sets its own, longer, timeout in its setup file).
  testTimeout: 30_000,
  projects: [
    {
      displayName: 'unit',
      testEnvironment: 'node',
      rootDir: __dirname,
      testMatch: ['<rootDir>/tests/unit/**/*.test.ts'],
      transform,
      moduleNameMapper,
      modulePathIgnorePatterns,
    },
    {
      displayName: 'integration',
      testEnvironment: 'node',
      rootDir: __dirname,
      testMatch: ['<rootDir>/tests/integration/**/*.test.ts'],
      transform,
      moduleNameMapper,
      modulePathIgnorePatterns,
      setupFilesAfterEnv: ['<rootDir>/tests/harness/integration-setup.ts'],
    },
  ],
};

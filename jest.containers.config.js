/**
 * The containers test (tests/containers/): the mesh as podman pods from the chart and the image
 * `make image` built. Run by `make test-containers`; not part of `make test` (it needs the image).
 */
const base = require('./jest.config.js');
const integration = base.projects.find((p) => p.displayName === 'integration');
module.exports = {
  projects: [{ ...integration, displayName: 'containers', testMatch: ['<rootDir>/tests/containers/**/*.test.ts'] }],
};

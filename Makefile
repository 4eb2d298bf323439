# qcow2-csi developer targets. `make help` lists them.
CARGO ?= cargo

.PHONY: help build demo test test-deps lint fmt clippy doc clean fuzz bench bench-nbd bench-snapshot image deploy kind-e2e

help: ## List targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## Build everything (release)
	$(CARGO) build --release --workspace

demo: ## qcow2util on a fresh image, then the CSI plugin run locally and driven by a client
	./hack/demo.sh

test: ## Run the whole test suite, installing its dependencies when missing
	./hack/test.sh

test-deps: ## Install the test dependencies only
	./hack/test-deps.sh

BENCH_ARGS ?=
bench: ## Engine vs QEMU qcow2 vs raw file, side by side (needs qemu-utils and fio; BENCH_ARGS=--quick)
	$(CARGO) build --release -p qcow2-engine
	./hack/bench.py $(BENCH_ARGS)

bench-nbd: ## qcow2-csi nbd vs qemu-nbd, qemu-storage-daemon and nbdkit on raw (fio's nbd engine, qemu-img bench, nbdcopy), then kernel nbd vs qemu-nbd -c in user-mode Linux (needs qemu-utils, fio, libnbd-bin, nbdkit, user-mode-linux)
	$(CARGO) build --release -p qcow2-csi
	./hack/bench_nbd.py $(BENCH_ARGS)
	./hack/bench_kernel.py $(BENCH_ARGS)

bench-snapshot: ## CSI CreateSnapshot/restore latency vs qemu-img create -b and a full copy (needs qemu-utils)
	./hack/bench-snapshot.sh

IMAGE ?= ghcr.io/qcow2-csi/qcow2-csi:0.1.0
image: ## Build the container image (Docker with BuildKit; IMAGE=... to tag it otherwise)
	docker build -t $(IMAGE) .

deploy: ## Render deploy/qcow2-csi.yaml from charts/qcow2-csi (needs the tools venv: make test-deps)
	.venv-tools/bin/python hack/deploy.py render

kind-e2e: ## On kind (Docker, kind, kubectl): image, install, example flows, csi-sanity; E2E=1 adds the k8s storage suite
	./tests/e2e/run.sh

lint: fmt clippy ## fmt --check and clippy -D warnings

fmt: ## Check formatting
	$(CARGO) fmt --all --check

clippy: ## Lint with warnings denied
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: ## Build the API docs
	$(CARGO) doc --workspace --no-deps

FUZZ_SECONDS ?= 60
fuzz: ## Run both fuzz targets for FUZZ_SECONDS each (needs the nightly toolchain and cargo-fuzz)
	./fuzz/make-seeds.sh >/dev/null
	cd fuzz && cargo +nightly fuzz run -s none open_image corpus/open_image -- -max_len=131072 -rss_limit_mb=1024 -max_total_time=$(FUZZ_SECONDS)
	cd fuzz && cargo +nightly fuzz run -s none ops corpus/ops -- -rss_limit_mb=1024 -max_total_time=$(FUZZ_SECONDS)

clean: ## Remove build output
	$(CARGO) clean

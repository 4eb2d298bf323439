# qcow2-csi developer targets. `make help` lists them.
CARGO ?= cargo

.PHONY: help build demo test test-deps lint fmt clippy doc clean

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

build: ## Build everything (release)
	$(CARGO) build --release --workspace

demo: ## Build qcow2util and show it working on a fresh image
	./hack/demo.sh

test: ## Run the whole test suite, installing its dependencies when missing
	./hack/test.sh

test-deps: ## Install the test dependencies only
	./hack/test-deps.sh

lint: fmt clippy ## fmt --check and clippy -D warnings

fmt: ## Check formatting
	$(CARGO) fmt --all --check

clippy: ## Lint with warnings denied
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: ## Build the API docs
	$(CARGO) doc --workspace --no-deps

clean: ## Remove build output
	$(CARGO) clean

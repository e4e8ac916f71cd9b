# k3rs — see README.md. Every target installs or builds what it needs.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
# Where `make run` keeps its data (a single-node cluster in the repository's .run/ directory).
RUN_DIR ?= $(CURDIR)/.run
# Where cargo puts binaries (CI may point CARGO_TARGET_DIR outside the clone).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)

.PHONY: all deps build run test bench lint fmt clean

all: build

deps:
	@./scripts/deps.sh

build: deps
	$(CARGO) build --release --bin k3rs

run: build
	@mkdir -p $(RUN_DIR)/data/agent/images
	@./scripts/build-test-images.sh $(RUN_DIR)/data/agent/images
	$(TARGET_DIR)/release/k3rs server --data-dir $(RUN_DIR)/data --write-kubeconfig $(RUN_DIR)/kubeconfig.yaml --bind-address 127.0.0.1

test: deps lint
	$(CARGO) test --workspace -- --test-threads=2

bench: deps
	$(CARGO) bench -p k3rs-storage
	$(CARGO) bench -p k3rs --bench api
	$(CARGO) bench -p k3rs --bench controllers
	$(CARGO) bench -p k3rs --bench housekeeping
	$(CARGO) bench -p k3rs --bench node

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(RUN_DIR)

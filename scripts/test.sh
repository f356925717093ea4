#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests through real FUSE
# mounts against a real S3 server (SeaweedFS, started by the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --bins --tests
cargo test -- --test-threads="${MEMBRIDGE_TEST_THREADS:-2}"

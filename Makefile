# One front door for chores.
.PHONY: fmt lint test bench up

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test:
	scripts/test.sh

bench:
	cargo build --release -p hodei-bench -p hodei-agent
	cargo build --profile agent -p hodei-agent
	bash -c 'source scripts/lib/deps.sh && hodei_ensure_nats && hodei_ensure_postgres && export HODEI_NATS_SERVER HODEI_TEST_DATABASE_URL HODEI_DATABASE_URL HODEI_PG_PORT && target/release/hodei-bench all'

up:
	scripts/up.sh

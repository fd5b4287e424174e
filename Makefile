# One front door for chores.
.PHONY: fmt lint test up

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test:
	scripts/test.sh

up:
	scripts/up.sh

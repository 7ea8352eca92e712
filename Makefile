.PHONY: setup demo test

# Quickstart: `make demo` (sets up .venv/ and runs the live-training demo) and
# `make test` (sets up .venv/ and runs the tests).
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/livetrain demo

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

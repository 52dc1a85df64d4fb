# The two entry points: `make bench` (the main job) and `make test`. Both set everything up first.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup test bench bench-full clean

setup:
	./scripts/setup.sh

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.quick

clean:
	rm -rf .venv build *.egg-info .pytest_cache

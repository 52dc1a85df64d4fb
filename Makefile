# The two entry points: `make bench` (the main job) and `make test`. Both set everything up first.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup test bench bench-full bench-store clean

setup:
	./scripts/setup.sh

# COLDSTART_STRICT: a test skipped for a missing tool fails (setup installed them all; tests/conftest.py).
test: setup
	COLDSTART_STRICT=1 $(PY) -m pytest -q

# The quick cold-start suite (hello, python, torch x native, pull, cold, warm; loopback; 3 repeats).
bench: setup
	$(PY) -m tools.cli bench --suite quick --out bench-out

bench-full: setup
	$(PY) -m tools.cli bench --suite full --out bench-out/full

# The image-store benchmark (import speed local and S3, dedup, index load, import-torch working set).
bench-store: setup
	$(PY) -m bench.store_bench --out bench-out

clean:
	rm -rf .venv build *.egg-info .pytest_cache

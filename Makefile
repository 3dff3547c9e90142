# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# The engine's core modules are compiled with mypyc when possible (NATIVE=0 to skip);
# if compiling fails the same code runs as plain Python and a warning says so.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE ?= 1
NATIVE_SRC := exchange/types.py exchange/markets.py exchange/book.py exchange/accounts.py \
	exchange/engine.py exchange/protocol.py exchange/state.py exchange/gateway.py \
	storage/audit.py storage/journal.py storage/tail.py \
	simulation/agents.py simulation/budget.py simulation/embedded.py
NATIVE_SO := exchange/*.so storage/*.so simulation/*.so *__mypyc*.so

.PHONY: setup run test bench native pure clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,native]'
	touch $(STAMP)

# Compile when a core module has no compiled twin or its source is newer than it.
setup: $(STAMP)
	@if [ "$(NATIVE)" = "0" ]; then \
		rm -f $(NATIVE_SO); echo "engine: plain Python (NATIVE=0)"; \
	else \
		need=0; \
		for f in $(NATIVE_SRC); do \
			so=$$(ls $${f%.py}.*.so 2>/dev/null | head -n 1); \
			if [ -z "$$so" ] || [ "$$f" -nt "$$so" ]; then need=1; fi; \
		done; \
		if [ $$need = 1 ]; then \
			mkdir -p build; \
			if $(VENV)/bin/mypyc $(NATIVE_SRC) > build/native.log 2>&1; then \
				touch exchange/*.so storage/*.so simulation/*.so; echo "engine: compiled with mypyc"; \
			else \
				rm -f $(NATIVE_SO); \
				echo "warning: compiling the engine with mypyc failed (see build/native.log); using plain Python"; \
			fi; \
		fi; \
	fi

native: setup

pure:
	$(MAKE) NATIVE=0 setup

run: setup
	$(PY) run/start_engine.py $(ARGS)

# The whole suite on the compiled core, then the engine's own tests on the plain sources
# too (EXCHANGE_PURE=1), so the two builds cannot drift apart in behaviour.
PURE_TESTS := tests/test_engine_rules.py tests/test_engine_stateful.py \
	tests/test_engine_differential.py tests/test_engine_determinism.py tests/test_markets.py \
	tests/test_persistence_state.py tests/test_review_findings.py \
	tests/test_persistence_files.py tests/test_gateway_smoke.py tests/test_sim_agents.py \
	tests/test_follower.py tests/test_sim_ledger_writer.py

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@if [ -n "$$(ls exchange/*.so 2>/dev/null)" ] && [ -z "$(PYTEST_ARGS)" ]; then \
		echo "engine tests again on the plain sources:"; \
		EXCHANGE_PURE=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_TESTS); \
	fi

bench: setup
	$(PY) bench/bench_engine.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis $(NATIVE_SO)

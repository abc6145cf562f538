# The README's two commands: `make run` and `make test`. Both rest on `make setup`, which is
# idempotent and needs nothing but Python 3.11+ on the machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
FS := $(VENV)/bin/flowsession
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup run demo test test-ray bench

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml uv.lock
	$(PYTHON) -m pip install --quiet --disable-pip-version-check 'uv>=0.5,<1'
	$(PYTHON) -m uv sync --frozen --compile-bytecode --extra ray
	@# bubblewrap sandboxes sessions; without it they run unsandboxed (session show says so)
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }; }; } \
	  || echo "note: bubblewrap is not installed: sessions will run without a sandbox"
	@# the web UI's end-to-end tests (tests/ui) drive Debian's chromium (never `playwright install`)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } \
	  || echo "note: chromium is not installed: the web UI's tests (tests/ui) will be skipped"
	@touch $@

# The product's main job: the server (REST API at http://127.0.0.1:8765, docs at /docs) with the
# example flows registered; it prints its URL and the administrator's token. `make demo` is an
# end-to-end tour of the CLI on examples/flows/hello.
run: setup
	$(FS) image build
	@# `image build` spoke to the home's background server: this one takes its place
	$(FS) server stop
	$(FS) server --show-token --register examples/flows/hello \
	  --register examples/flows/shared-reqs --register examples/flows/flex-echo

demo: setup
	$(FS) image list
	@echo "--- the environment of examples/flows/hello (env_id):"
	$(FS) env build examples/flows/hello
	$(FS) env packages examples/flows/hello --json | $(VENV)/bin/python -c \
	  "import json,sys; p=json.load(sys.stdin); r=[x for x in p if x['origin']=='requirements']; \
	  print(f'{len(p)} packages: {len(p)-len(r)} from the image, added by requirements.txt:', \
	  ', '.join(x['name']+'=='+x['version'] for x in r))"
	@echo "--- a session for the flow: sandboxed, within its VM size, warm"
	$(FS) session start examples/flows/hello
	$(FS) flow test examples/flows/hello --inputs name=Ada
	$(FS) flow test examples/flows/hello --inputs name=Grace
	@echo "--- a batch run over examples/flows/hello/data.jsonl on the same session"
	$(FS) run create --flow examples/flows/hello --data examples/flows/hello/data.jsonl \
	  --column-mapping 'name=$${data.name}' --name hello-$$(date +%s) --stream --json \
	  | $(VENV)/bin/python -c "import json,sys; r=json.load(sys.stdin); print(r['name'], r['status'], r['summary']); open('.last-run','w').write(r['name'])"
	$(FS) run show-details $$(cat .last-run) && rm -f .last-run
	$(FS) session events examples/flows/hello
	$(FS) session stop examples/flows/hello

# Everything but the Ray half (the contract suite's local half runs here), then the Ray half.
test: setup
	$(VENV)/bin/python -m pytest --ignore=tests/ray
	$(MAKE) --no-print-directory test-ray

# The Ray tests (tests/ray, and the contract suite's Ray half) start a real cluster (a head and
# a second node) on 127.0.0.1. Ray binds the machine's own address wherever it finds one, so
# they run in a network namespace holding only loopback (tests/helpers/netns.py: unshare --net,
# lo up, and whatever is left in it killed). It has no package index: the default image is
# built before entering it (into TEST_IMAGES, kept between runs).
TEST_IMAGES ?= /tmp/flowsession-test-images-$(shell id -u)
test-ray: setup
	$(VENV)/bin/python tests/helpers/prebuild.py $(TEST_IMAGES)
	FLOWSESSION_TEST_IMAGES=$(TEST_IMAGES) $(VENV)/bin/python tests/helpers/netns.py \
	  $(VENV)/bin/python -m pytest tests/ray tests/contract $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/env_build.py
	$(VENV)/bin/python bench/session_start.py
	$(VENV)/bin/python bench/batch.py
	$(VENV)/bin/python bench/api.py
	$(VENV)/bin/python bench/ui.py

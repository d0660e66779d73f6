# dpcli: `make demo` and `make test` work from a fresh clone; both create .venv here first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DP := $(VENV)/bin/dp
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
# The install skips byte-compiling (pip --no-compile): Python compiles what it imports on first use and caches
# it in the venv, which a PYTHONDONTWRITEBYTECODE in the environment would forbid (every process would then
# compile torch and diffusers again: ~8 CPU-seconds each). Empty here means "write the cache".
export PYTHONDONTWRITEBYTECODE :=
# Example third-party plugins: installed into the venv like any plugin, and tested by `make test`.
PLUGINS := plugins/dpcli-obd plugins/dpcli-dit

.PHONY: install demo test test-fast lint format completions bench bench-quick bench-table1 bench-gpu clean

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	@# One resolve for dpcli and the plugins (their dependencies are dpcli's); --no-compile: Python compiles
	@# only the modules it imports, on first use, instead of all ~17,000 files of torch, CUDA libraries and co.
	$(PY) -m pip install --quiet --progress-bar off --no-compile -e '.[dev]' $(addprefix -e ,$(PLUGINS))
	@# A CPU-only torch that cannot load torchvision breaks diffusers and timm: fail loudly here.
	@$(PY) -c "import torch, torchvision, torchvision.ops, timm, diffusers, fvcore, torch_pruning; \
		print('installed torch', torch.__version__, 'torchvision', torchvision.__version__)" || \
		{ echo "torch and torchvision do not import together; see README (Troubleshooting)"; exit 1; }
	touch $(STAMP)

install: $(STAMP)


# The main job on the built-in model, end to end: inspect -> score (diff-taylor) -> prune to ~0.56 of the MACs
# -> fine-tune with dp's recovery recipe (README, "Fine-tuning"; measured in docs/benchmarks.md, "The demo's
# recovery recipe") -> eval original, pruned and fine-tuned (256 samples, DDIM 50, FID vs builtin:digits)
# -> one summary table. PNGs, models and reports go into $(DEMO_OUT)/ (rerunnable: --force).
# Every step runs alone on all cores, one after the other: the evaluations measure the latencies the summary's
# speedup column shows, and a latency measured beside another process is noise (side by side, two same-shape
# models measured 0.72x and 1.19x; docs/benchmarks.md, "The demo's recovery recipe").
DEMO_EVAL := --data builtin:digits --num-samples 256 --steps 50 --seed 0 --repeats 30 --force
DEMO_REPORTS := --report $(DEMO_OUT)/eval-original --report $(DEMO_OUT)/eval-pruned --report $(DEMO_OUT)/eval-finetuned
DEMO_STEPS := demo-inspect demo-score demo-prune demo-finetune demo-eval-original demo-eval-pruned demo-eval-finetuned
.PHONY: $(DEMO_STEPS)
demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(MAKE) --no-print-directory demo-eval-original demo-eval-pruned demo-eval-finetuned
	@echo "Plots: $(DEMO_OUT)/timestep-scan.png (diff-taylor scan), $(DEMO_OUT)/finetune-loss.png (fine-tuning loss);"
	@echo "side by side, one row per model from the same noise: $(DEMO_OUT)/compare/grid.png"
	$(DP) compare $(DEMO_REPORTS) --num-samples 8 --force -o $(DEMO_OUT)/compare --json > /dev/null
	$(DP) compare $(DEMO_REPORTS) --num-samples 256 --retime-reports --repeats 30 --summary

# The steps of the demo and what each waits for (`make demo` runs them one at a time).
demo-score: demo-inspect
demo-prune: demo-score
demo-finetune: demo-prune
demo-eval-pruned demo-eval-finetuned: demo-finetune
demo-inspect demo-eval-original: $(STAMP)
demo-inspect:
	@mkdir -p $(DEMO_OUT)
	$(DP) inspect builtin:ddpm-digits --depth 1
demo-score:
	$(DP) score builtin:ddpm-digits --criterion diff-taylor --threshold 0.1 --data builtin:digits \
		-o $(DEMO_OUT)/scores.safetensors --plot $(DEMO_OUT)/timestep-scan.png
demo-prune:
	$(DP) prune builtin:ddpm-digits --scores $(DEMO_OUT)/scores.safetensors --target-macs 0.56 \
		--yes --force -o $(DEMO_OUT)/pruned
demo-finetune:
	$(DP) finetune $(DEMO_OUT)/pruned --data builtin:digits --steps 800 --batch-size 64 --lr 4e-4 --warmup 30 --schedule cosine --ema-decay 0.99 \
		--force -o $(DEMO_OUT)/finetuned
	cp $(DEMO_OUT)/finetuned/loss.png $(DEMO_OUT)/finetune-loss.png
demo-eval-original demo-eval-pruned demo-eval-finetuned: demo-eval-%:
	@echo "dp eval of the $* model (output: $(DEMO_OUT)/eval-$*.log)"; mkdir -p $(DEMO_OUT)
	@$(DP) eval $(DEMO_MODEL_$*) $(DEMO_EVAL) -o $(DEMO_OUT)/eval-$* > $(DEMO_OUT)/eval-$*.log 2>&1 || \
		{ cat $(DEMO_OUT)/eval-$*.log; exit 1; }
	@echo "dp eval of the $* model done:"; grep -E "^ +(FID|output) " $(DEMO_OUT)/eval-$*.log || true
DEMO_MODEL_original := builtin:ddpm-digits
DEMO_MODEL_pruned := $(DEMO_OUT)/pruned
DEMO_MODEL_finetuned := $(DEMO_OUT)/finetuned

test: $(STAMP)
	$(PY) -m ruff check dpcli tests plugins
	$(PY) -m pytest tests $(addsuffix /tests,$(PLUGINS))

# The edit loop: the suite without the tests marked slow (multi-process gloo runs, killed-and-resumed
# subprocesses, the plugin pip-install, tests over ~4 s idle), on every core (pytest-xdist). `make test`
# runs everything, in one process. Measured idle on 2 cores: 3 min 26 s (README, "Development").
test-fast: $(STAMP)
	$(PY) -m pytest tests $(addsuffix /tests,$(PLUGINS)) -m "not slow" -n auto

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

# Benchmarks (docs/benchmarks.md): each prints a table and writes JSON + Markdown + PNG into benchmarks/results/.
# bench-quick: every benchmark in its --quick mode (minutes on 2 cores; the Table 1 runner as a smoke test).
# bench: the full micro-benchmarks (a bigger machine); bench-table1: the digits Table 1 (long; resumable).
BENCH_SCRIPTS := scoring scan_budget pruned_speed sampling startup data export
bench-quick: $(STAMP)
	@for script in $(BENCH_SCRIPTS); do echo "== benchmarks/$$script.py --quick"; \
		$(PY) benchmarks/$$script.py --quick || exit 1; done
	$(PY) benchmarks/table1.py --quick

bench: $(STAMP)
	@for script in $(BENCH_SCRIPTS); do echo "== benchmarks/$$script.py"; \
		$(PY) benchmarks/$$script.py || exit 1; done

bench-table1: $(STAMP)
	$(PY) benchmarks/table1.py

# bench-gpu: the GPU check (one CUDA GPU, under 5 minutes by estimate; exits 2 without CUDA).
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --quick

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache

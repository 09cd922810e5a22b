# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export MALARIA_SCREEN_DATA ?= $(abspath ../shared/data)

.PHONY: demo test venv lint bench-data bench-train bench-predict train-default clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/malaria-screen predict src/malaria_screen/assets/samples --out demo_out/predictions.csv
	$(BIN)/malaria-screen smear src/malaria_screen/assets/demo_field/chula_rbc_1.jpg --out demo_out/smear

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# Benchmarks: print figures; not tests.
bench-data: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py $(MALARIA_SCREEN_DATA)/nih_cell_images

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py $(MALARIA_SCREEN_DATA)/nih_cell_images

bench-predict: $(STAMP)
	$(BIN)/python benchmarks/bench_predict.py $(MALARIA_SCREEN_DATA)/nih_cell_images

# Re-train the bundled default model (the recipe documented in README.md).
train-default: $(STAMP)
	$(BIN)/malaria-screen train $(MALARIA_SCREEN_DATA)/nih_cell_images --model cellnet --out runs/default

clean:
	rm -rf $(VENV) demo_out bench_out

# The two commands a new machine needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch wheels: pinned here so a fresh machine takes the builds that lie on its disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench lint clean

$(BIN)/sarl: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/sarl

setup: $(BIN)/sarl

demo: $(BIN)/sarl
	$(BIN)/sarl demo

# Two pytest processes: one Ray driver cannot move to a second cluster (tests/integration/conftest.py).
test: $(BIN)/sarl
	$(BIN)/python -m pytest tests -m "not two_node"
	$(BIN)/python -m pytest tests -m two_node

bench: $(BIN)/sarl
	$(BIN)/python bench/model_forward.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/sweep.py

lint: $(BIN)/sarl
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

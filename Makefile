# The two commands a new machine needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Label Studio server the tests start lives in a venv of its own: its dependencies are not Ray's.
VENV_LS := .venv-ls

.PHONY: setup label-studio demo test test-fast bench lint clean

# The install step is scripts/install.sh, the cluster image's too (Dockerfile): the PyTorch pins are its own, so
# both install the same wheels (`make setup TORCH_PINS="torch==..."` overrides them here).
$(BIN)/sarl: pyproject.toml scripts/install.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	sh scripts/install.sh $(BIN)/python test
	touch $(BIN)/sarl

setup: $(BIN)/sarl

$(VENV_LS)/bin/label-studio: scripts/install_label_studio.sh
	PYTHON=$(PYTHON) sh scripts/install_label_studio.sh $(VENV_LS)
	touch $(VENV_LS)/bin/label-studio

label-studio: $(VENV_LS)/bin/label-studio

demo: $(BIN)/sarl
	$(BIN)/sarl demo

# Two pytest processes: one Ray driver cannot move to a second cluster (tests/integration/conftest.py).
# The model library's docstring examples run with the first (--doctest-modules in pyproject.toml).
test: $(BIN)/sarl $(VENV_LS)/bin/label-studio
	$(BIN)/python -m pytest tests src/sarl/model -m "not two_node"
	$(BIN)/python -m pytest tests -m two_node

# Everyday work, a few minutes: unit tests, the docstring examples, S3 against moto's server, one Ray Train run.
FAST_TESTS := tests/unit src/sarl/model tests/integration/test_storage_s3.py \
	tests/integration/test_storage_node_cache_s3.py tests/integration/test_vocab_store_s3.py \
	tests/integration/test_train.py::test_train_on_local_storage_and_evaluate
test-fast: $(BIN)/sarl
	$(BIN)/python -m pytest $(FAST_TESTS)

bench: $(BIN)/sarl
	$(BIN)/python bench/model_forward.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/sweep.py

lint: $(BIN)/sarl
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(VENV_LS) build *.egg-info src/*.egg-info

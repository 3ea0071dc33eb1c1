# Two commands do all the set-up: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint install data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: Debian's package where apt exists, else the official download, else a message.
data: $(STAMP)
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "Installed Debian package dataset-fashion-mnist" \
	  || $(BIN)/firmad data prepare fashion-mnist --download \
	  || echo "Fashion-MNIST unavailable: see 'firmad data prepare --help'"; \
	else \
	  $(BIN)/firmad data prepare fashion-mnist --download \
	  || echo "Fashion-MNIST unavailable: see 'firmad data prepare --help'"; \
	fi

demo: data
	$(BIN)/firmad demo

test: data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

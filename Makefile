# Two commands a newcomer needs: `make run` and `make test`. Both set everything up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.eebench-installed
# the tests run the Ray and submitit executors too (eebench[ray], eebench[slurm])
EXTRAS ?= test,ray,slurm

.PHONY: run test data lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

data:
	@bash scripts/ensure-fashion-mnist.sh $(BIN)/python

run: $(STAMP) data
	$(BIN)/eebench run suites/fixed_budget_1epoch.yaml

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache

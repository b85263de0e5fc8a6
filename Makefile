# `make demo` and `make test` set up .venv on first use (scripts/setup_venv.sh), then run.
VENV := .venv
SETUP_DONE := $(VENV)/.setup-done

.PHONY: demo test lint setup

DEMO_DATA := runs/data/demo

# the demo's data steps are idempotent: a complete dataset with the same settings and finished feature
# parts are reused, so a second `make demo` goes straight to training
demo: $(SETUP_DONE)
	$(VENV)/bin/fmrl data prepare-synthetic $(DEMO_DATA) --shard-size 500
	$(VENV)/bin/fmrl features $(DEMO_DATA) --image-size 96
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m trainer.cli train --config configs/demo.yaml

test: $(SETUP_DONE)
	$(VENV)/bin/python -m pytest

lint: $(SETUP_DONE)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup: $(SETUP_DONE)

$(SETUP_DONE): scripts/setup_venv.sh requirements/cpu.txt pyproject.toml
	bash scripts/setup_venv.sh
	touch $@

# dedup-rollout: the two commands of the quickstart are `make demo` and `make test`.
SHELL := /bin/bash
VENV  := .venv
# Test files run in parallel (each worker has its own throwaway cluster and lab); 2 cores here.
PYTEST_WORKERS ?= 2
BIN   := $(VENV)/bin
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: bootstrap demo test unit lint pytest bench lab-up lab-down clean

bootstrap:            ## install OS packages (as root) and the venv
	@bash scripts/bootstrap.sh

lab-up: bootstrap     ## create/converge the local lab (PostgreSQL + ETL + crontab)
	$(BIN)/ansible-playbook playbooks/lab_up.yml

lab-down: bootstrap   ## remove the lab completely
	$(BIN)/ansible-playbook playbooks/lab_down.yml

demo: lab-up          ## lab up, run the whole runbook on it, print before/after
	$(BIN)/ansible-playbook deploy_dedup.yml
	@$(BIN)/python scripts/show_report.py --latest reports/lab

lint: bootstrap       ## ruff, yamllint, ansible-lint (production profile), ansible-test validate-modules
	$(BIN)/ruff check .
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production
	bash scripts/sanity.sh

unit: bootstrap       ## pure-logic tests, no cluster: seconds, first
	$(BIN)/pytest -q tests/unit

pytest: bootstrap
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: unit lint pytest  ## the whole suite (what CI runs)

bench: bootstrap      ## benchmark against the runbook's own method (prints a table)
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf .pytest_cache .ruff_cache

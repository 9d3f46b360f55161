# The two commands of the README: `make serve` (the main job) and `make test` (the whole suite).
# Each builds .venv first (scripts/bootstrap.sh returns at once when nothing changed).
VENV := .venv/bin

.PHONY: setup serve test
setup:
	@scripts/bootstrap.sh

serve: setup
	$(VENV)/rexnet-serve

test: setup
	$(VENV)/python -m pytest

# The two commands of the README: `make serve` (the main job) and `make test` (the whole suite).
# Each builds .venv first (scripts/bootstrap.sh returns at once when nothing changed).
VENV := .venv/bin

.PHONY: setup serve test oip-proto
setup:
	@scripts/bootstrap.sh

serve: setup
	$(VENV)/rexnet-serve

test: setup
	$(VENV)/python -m pytest

# The Open Inference Protocol's gRPC definitions again, from the kserve package (setup does this once).
oip-proto: setup
	@.venv/bin/python scripts/oip_descriptor.py

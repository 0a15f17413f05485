# Shortcuts; each target is a script under scripts/ that installs what it needs.
.PHONY: up test bench reliability

up:
	bash scripts/up

test:
	bash scripts/test

bench:
	bash scripts/bench

reliability:
	bash scripts/reliability

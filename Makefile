# `make train` and `make test` each set up .venv/ first, so both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# TFDS reads prepared datasets from TFDS_DATA_DIR. Use the prepared copy beside
# the checkout when there is one; otherwise TFDS's default (~/tensorflow_datasets),
# where an online machine downloads tiny_shakespeare by itself.
ifneq ($(wildcard ../shared/tfds),)
TFDS_DATA_DIR ?= $(abspath ../shared/tfds)
endif
ifdef TFDS_DATA_DIR
export TFDS_DATA_DIR
endif

CONFIG ?= experiments/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
ARGS ?=
# Tests run in 2 pytest workers (the CI machine has 2 cores), a file's tests on one worker, so its
# module-scoped fixtures (trained runs) are built once (tests/conftest.py hands out the long files first).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install train prepare test test-faults bench bench-memory bench-gpt2 bench-fast-path bench-data bench-serve eval sample serve online clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	touch $(STAMP)

train: install
	$(PY) -m lm.main --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

# Tokenize the run's corpora once into token caches (Apache Beam; a training run does it for any cache it lacks).
prepare: install
	$(PY) -m lm.main --config $(CONFIG) --workdir $(WORKDIR) --mode prepare $(ARGS)

eval: install
	$(PY) -m lm.main --config $(CONFIG) --workdir $(WORKDIR) --mode eval $(ARGS)

sample: install
	$(PY) -m lm.main --config $(CONFIG) --workdir $(WORKDIR) --mode sample $(ARGS)

# The run's model behind an OpenAI-compatible API on 127.0.0.1:8000 (playground at /), hot-swapping to each newer
# checkpoint; feedback goes to WORKDIR/serve/chunks (docs/serving.md).
serve: install
	$(PY) -m lm.main --config $(CONFIG) --workdir $(WORKDIR) --mode serve $(ARGS)

# Keeps training the served run on the feedback chunks `make serve` writes (a second shell beside it): each chunk
# is trained, gated and, if promoted, served (docs/serving.md, "The loop").
ONLINE_WORKDIR ?= runs/online
online: install
	$(PY) -m lm.main --config experiments/online_shakespeare.py --workdir $(ONLINE_WORKDIR) --mode online \
	    --config.online.stream=dir:$(ONLINE_WORKDIR)/serve/chunks $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS) -m "not faults" tests

# The end-to-end fault-injection runs (signals to some processes of a job, seeded kills, a full disk, a second
# run on a locked workdir: docs/reliability.md); CI runs them after `make test`.
test-faults: install
	$(PY) -m pytest $(PYTEST_ARGS) -m faults tests

# The JAX step and its PyTorch eager peer, same shapes, same machine, same run;
# then memory per device of GPT-2 small under each sharding preset.
bench: install bench-memory
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) benchmarks/run.py --config $(CONFIG) $(ARGS)

bench-memory: install
	$(PY) benchmarks/memory.py --config experiments/gpt2_small.py --devices 8 --batch_size 8

# On a GPU: GPT-2 124M on the fast path vs its PyTorch peer (torch.compile, bf16, SDPA), same device, same
# invocation (the device needs a CUDA build of torch); then what each fast-path option does there.
bench-gpt2: install
	$(PY) benchmarks/run.py --config experiments/gpt2_124m.py --rounds 3 --steps 50 $(ARGS)

bench-fast-path: install
	$(PY) benchmarks/fast_path.py --config experiments/gpt2_124m.py $(ARGS)

# Token caches at scale: Beam preparation (1 and 2 workers), start-up on a prepared 250 MB / 1 GB corpus, the
# loader's tokens/s. Generates its corpora from ../shared under /tmp/lm-bench-data (several GB of disk).
bench-data: install
	$(PY) benchmarks/data.py $(ARGS)

# The server under 1, 8 and 32 streaming clients against --mode bench's decoding, and a hot swap under load.
bench-serve: install
	$(PY) benchmarks/serve.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info runs .pytest_cache

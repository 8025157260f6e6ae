# One transcription runtime's engine, chosen at build time:
#   docker build -f docker/runtime.Dockerfile --build-arg RUNTIME=faster-whisper .
#   docker build -f docker/runtime.Dockerfile --build-arg RUNTIME=nemo --build-arg EXTRAS=nemo .
# No weights are baked in: the engine pulls a model into /models (a shared volume) on first use.
# faster-whisper on CUDA also needs cuBLAS and cuDNN 9, e.g.
#   --build-arg PACKAGES="nvidia-cublas-cu12 nvidia-cudnn-cu12==9.*"
ARG BASE=python:3.11-slim
FROM ${BASE}

# Up to the pip install, the same steps as service.Dockerfile: the builder reuses those layers,
# so faster-whisper (a dependency of dalston itself) costs no second install.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 dalston && mkdir /models && chown dalston /models

WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the code reinstalls only Dalston.
# With the `otel` extra, so setting the OTEL_* variables sends traces (README "Traces").
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['otel']; subprocess.run([sys.executable, '-m', 'pip', 'install', *deps], check=True)"
COPY README.md ./
COPY dalston dalston
COPY actors actors
COPY catalog catalog
COPY nats nats
RUN pip install --no-deps . && rm -rf /src

ARG RUNTIME=faster-whisper
ARG EXTRAS=""
ARG PACKAGES=""
# The runtime's extras, from the installed dalston's metadata (faster-whisper has none).
RUN if [ -n "$EXTRAS$PACKAGES" ]; then pip install ${EXTRAS:+"dalston[$EXTRAS]"} $PACKAGES; fi

WORKDIR /home/dalston
USER dalston
ENV DALSTON_RUNTIME=${RUNTIME} DALSTON_MODELS_DIR=/models
# Exec form: the engine is PID 1, which its health check relies on (compose.yaml).
ENTRYPOINT ["dalston", "serve", "engine"]

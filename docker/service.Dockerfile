# The gateway, the orchestrator and the engines of the base install (audio-prepare, merge, diarize):
# compose.yaml picks the service with `command`. Audio decoding needs no system ffmpeg: the PyAV wheel
# carries its own libraries.
# BASE: any Debian-like image with Python 3.11+ and pip (scripts/compose-check --local-base
# builds one from Debian's packages).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user; /models is created here so a fresh named volume mounted on it is
# writable by that user.
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

WORKDIR /home/dalston
USER dalston
ENV DALSTON_MODELS_DIR=/models
ENTRYPOINT ["dalston"]
CMD ["serve", "gateway"]

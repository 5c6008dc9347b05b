# irn-ray runtime image: CUDA-enabled PyTorch + Ray + the project, for every node of cluster.yaml.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential openssh-client rsync \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/irn-ray
COPY requirements.txt ./
RUN pip install --upgrade pip && pip install -r requirements.txt

COPY pipeline/ pipeline/
COPY jobs/ jobs/
COPY configs/ configs/
COPY tests/test_purity.py tests/
ENV PYTHONPATH=/opt/irn-ray

# Import check of the whole package (the tests' import-purity check, no GPU needed).
RUN python -m pytest -q tests/test_purity.py && python -c "import pipeline.orchestrate, jobs.label"

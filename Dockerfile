# megatron-syne on an NGC PyTorch image: CUDA, NCCL, cuDNN, torch, Transformer Engine and apex
# come with the base image and are kept as they are; megatron-core is pinned to what the code is
# tested against (requirements.txt) and installed without dependencies so that pip never
# replaces the image's torch.
#
#   docker build -t megatron-syne:latest .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /data:/data -v /ckpt:/ckpt megatron-syne:latest
#
# megatron-core 0.16.x is released against the NGC container of the month before; override
# the base with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 for another release.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-syne

# Pin exactly what the image ships for the CUDA stack (torch, triton, TE, apex, numpy, NVIDIA
# libraries) and nothing else: NGC's own /etc/pip/constraint.txt also pins unrelated packages
# and would reject our requirement pins.
# (`pip list --format=freeze` prints name==version even for packages installed from files.)
RUN mkdir -p /etc/pip \
    && pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine[-_a-z0-9]*|apex|numpy|nvidia-[a-z0-9-]+|pytorch-triton)==' \
        > /etc/pip/syne-keep.txt \
    && cat /etc/pip/syne-keep.txt
ENV PIP_CONSTRAINT=/etc/pip/syne-keep.txt

# megatron-core's own dependencies (torch, numpy, packaging) are already in the image.
RUN pip install --no-deps "megatron-core==${MEGATRON_CORE_VERSION}" "packaging>=24.2"

# The project's pins minus the packages the image owns (the CPU pins of torch/triton/numpy and
# megatron-core above must not be installed over the image's builds).
COPY requirements.txt requirements-nodeps.txt ./
RUN grep -viE '^(torch|triton|numpy|megatron-core)==' requirements.txt > /tmp/requirements-image.txt \
    && pip install -r /tmp/requirements-image.txt \
    && pip install --no-deps -r requirements-nodeps.txt

COPY . .
RUN pip install --no-deps --no-build-isolation -e .

# Fail the build, not the first training job, if the stack does not import together.
RUN python -c "import torch, megatron.core, transformer_engine, megatron_syne; \
from megatron_syne.models.llama3 import transformer_engine_available; \
assert transformer_engine_available(), 'Transformer Engine does not import'; \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

CMD ["/bin/bash"]

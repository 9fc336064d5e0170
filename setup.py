"""megahet: Megatron-style model-parallel LLM training across mixed hardware.

The top-level folders backends/, models/ and tokenizer/ are installed under the megahet namespace
(megahet.backends, megahet.models, megahet.tokenizer) so an installed megahet can neither shadow nor be
shadowed by other packages with those generic names.
"""
from setuptools import setup

FOLDERS = {"megahet": "megahet", "megahet.backends": "backends", "megahet.models": "models",
           "megahet.tokenizer": "tokenizer"}
SUBPACKAGES = ["megahet.parallel", "megahet.moe", "megahet.hetero", "megahet.data", "megahet.training", "megahet.hf"]

setup(
    name="megahet",
    version="0.1.0",
    description="Megatron-style model-parallel training of one LLM across mixed hardware",
    python_requires=">=3.10",
    packages=list(FOLDERS) + SUBPACKAGES,
    package_dir=FOLDERS,
    # torch 2.5: SDPA's enable_gqa (megahet.kernels). Every other requirement is imported by megahet
    # (sentencepiece: tokenizer, pyyaml: configs/plans, numpy: data, safetensors: checkpoints).
    install_requires=["torch>=2.5", "sentencepiece>=0.1.99", "pyyaml>=6.0", "numpy>=1.24",
                      "safetensors>=0.4"],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "tensorboard>=2.14", "matplotlib>=3.7", "wandb>=0.16"],
        "wandb": ["wandb>=0.16"],
        "tensorboard": ["tensorboard>=2.14"],
        # Never installed in dev/CI: without Ascend's CANN libraries torch_npu breaks `import torch`.
        "npu": ["torch-npu"],
    },
    entry_points={
        "megahet.backends": [
            "cpu = megahet.backends.cpu:CPUBackend",
            "cuda = megahet.backends.cuda:CUDABackend",
            "npu = megahet.backends.npu:NPUBackend",
            "sim = megahet.backends.sim:SimBackend",
        ],
        "console_scripts": [],
    },
)

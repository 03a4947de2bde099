"""megatron_pr2: Predictive Routing Replay (PR2) for RL on Mixture-of-Experts LLMs, on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_pr2",
    version="0.1.0",
    description="Megatron-Core RL for MoE LLMs with Predictive Routing Replay (PR2), R2 and R3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["megatron_pr2", "megatron_pr2.*"]),
    install_requires=[
        # torch: the CPU wheel (2.13.0) here, a CUDA build on GPU machines; tools/setup_env.sh
        # installs it first and holds it with a constraints file so nothing pulls another torch.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=4.57",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "einops>=0.7",
        "matplotlib>=3.8",
        "math-verify>=0.7",
        "pyyaml>=6.0",
        "requests>=2.31",
        "pybase64>=1.3",  # SIMD base64 for routed-expert payloads (~10x the standard library)
        "psutil>=5.9",  # megatron-core distributed checkpointing needs it at save time
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
        "gpu": ["transformer-engine[pytorch]>=2.6"],
        # SGLang runs in its own virtual environment (tools/sglang_env.sh); see README.
    },
)

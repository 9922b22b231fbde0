from setuptools import find_packages, setup

setup(
    name="megatron-syne",
    version="0.1.0",
    description="Continual pre-training of Llama-3 on Megatron-Core: the Llama-3-SynE recipe",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_syne", "megatron_syne.*"]),
    license="Apache-2.0",
)

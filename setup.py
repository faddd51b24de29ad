"""mdm_jax: masked diffusion models (MDM, Prime) of discrete data in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mdm_jax",
    version="0.1.0",
    description="Masked diffusion models (MDM, Prime partial masking) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mdm_jax", "mdm_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",          # tfds imports it unconditionally
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tokenizers>=0.20",
        "tiktoken>=0.8",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
    },
)

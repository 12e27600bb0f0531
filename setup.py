"""selmix-jax: selective mixup fine-tuning for non-decomposable objectives, in JAX."""

import setuptools

setuptools.setup(
    name="selmix_jax",
    version="0.1.0",
    description=(
        "SelMix in JAX/Flax: selective mixup fine-tuning for worst-class recall, "
        "H-/G-mean and coverage-constrained objectives."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["selmix_jax", "selmix_jax.*"]),
    package_data={"selmix_jax.data": ["*.txt"]},
    python_requires=">=3.11",
    install_requires=[
        # Numerical core (metrics, objectives, gains import only these two).
        "jax>=0.6,<0.13",
        "numpy>=1.26,<3",
        # Training stack.
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "chex>=0.1.88,<0.2",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "absl-py>=2.1,<3",
        # Input pipelines (TFDS sources, image folders) and clu's TensorBoard writer.
        "tensorflow-cpu>=2.16,<2.22",
        "tensorflow-datasets>=4.9.6,<5",
        "tensorboard>=2.16,<2.22",
        "dm-pix>=0.4.3,<0.5",
        "scikit-learn>=1.4,<2",  # bundled digits data set for the default run
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "hypothesis>=6.100,<7",
            "scipy>=1.12,<2",
        ],
    },
)

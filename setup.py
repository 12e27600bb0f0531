"""selmix-jax: selective mixup fine-tuning for non-decomposable objectives, in JAX.

`pip install selmix-jax` installs the numerical core only (jax + numpy): confusion matrices,
metrics, objectives, gains, pair sampling. Extras:
  train  everything `launch/main.py` needs for digits and image folders (Flax, Optax, Orbax, ...)
  tfds   TensorFlow Datasets sources (cifar10/100, stl10, ImageNet); TensorFlow only for those
  torch  converting the authors' PyTorch checkpoints (`python -m selmix_jax.convert`)
  test   all of the above plus the test tools
"""

import setuptools

_TRAIN = [
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "chex>=0.1.88,<0.2",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "clu>=0.0.12,<0.1",  # selmix_jax.clu_metrics only (its core has no TensorFlow)
    "absl-py>=2.1,<3",
    "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
    "dm-pix>=0.4.3,<0.5",
    "grain>=0.2.18,<0.3",  # streaming input: worker processes + device prefetch, no TensorFlow
    "scikit-learn>=1.4,<2",  # the bundled digits data set of the default run
    "pillow>=10,<14",
    "matplotlib>=3.8,<4",
    # The size limit of the launcher's persistent compilation cache turns on JAX's file lock,
    # which needs it (without it every cache read fails with a warning).
    "filelock>=3.12,<5",
]
_TFDS = [
    "tensorflow-cpu>=2.16,<2.22",
    "tensorflow-datasets>=4.9.6,<5",
]
# The CPU wheel is enough to read checkpoints; the upper bound keeps pip on the 2.13 CPU build
# where a machine offers one beside newer CUDA builds (newer releases work too).
_TORCH = ["torch>=2.3,<2.14"]
_TEST = [
    "pytest>=8,<10",
    "pytest-xdist>=3.5,<4",  # the README's test command runs one worker per core
    "hypothesis>=6.100,<7",
    "scipy>=1.12,<2",
    "build>=1.2,<2",
]

setuptools.setup(
    name="selmix_jax",
    version="0.2.0",
    description=(
        "SelMix in JAX/Flax: selective mixup fine-tuning for worst-class recall, "
        "H-/G-mean and coverage-constrained objectives."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=setuptools.find_packages(include=["selmix_jax", "selmix_jax.*"])
    + ["selmix_jax.configs"],
    # The repository's configs/ ship as `selmix_jax.configs`: config files import their base
    # and each other from there, wherever the command is run.
    package_dir={"selmix_jax.configs": "configs"},
    package_data={"selmix_jax.data": ["*.txt"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.6,<0.13",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "train": _TRAIN,
        "tfds": _TFDS,
        "torch": _TORCH,
        "test": _TRAIN + _TFDS + _TORCH + _TEST,
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

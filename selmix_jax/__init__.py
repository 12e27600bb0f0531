"""selmix-jax: SelMix (selective mixup fine-tuning) in JAX/Flax.

The numerical core (`confusion`, `metrics`, `objectives`, `gains`, `sampling`) imports
with only jax and numpy; `clu_metrics` adds clu and flax; training, data and checkpoint
modules are imported on demand.
"""

__version__ = "0.1.0"

import os as _os

# A checkout used without `pip install` (`PYTHONPATH=<checkout>`, as on a borrowed GPU machine):
# its configs/ folder is `selmix_jax.configs`, as setup.py's package_dir maps it when installed.
_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_CHECKOUT, "configs", "__init__.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "configs")
):
  __path__.append(_CHECKOUT)  # pylint: disable=undefined-variable  (a package's __path__)

"""Runs a selmix-jax job: `python launch/main.py --config=configs/<name>.py --workdir=<dir>`.

Without --config it runs `configs/default.py`: long-tailed digits (bundled with scikit-learn, no
download), pre-training then SelMix fine-tuning for min recall, ending with a before/after table.

`--imports=my_pkg.my_module` (repeatable) imports your modules before the config is read, so an
objective, model, pair strategy or data set they register can be named in the config. JAX flags
work from the command line (`--jax_debug_nans`, `--jax_platforms=cpu`, ...). Multi-host (TPU pods,
multi-node GPU): `--distributed` (or SELMIX_DISTRIBUTED=1) calls `jax.distributed.initialize()`
with the cluster's auto-detection; `--coordinator_address=host:port --num_processes=N
--process_id=i` passes the layout explicitly. SIGTERM/SIGINT stop the run after the current step
with a checkpoint (exit status 128 + the signal number); the same command resumes it.

Exit status: 0 done; 1 an unexpected error (a bug: with its traceback); 2 a user's mistake, printed
as one line on stderr that names the file or field, what was found and what was expected, without
a traceback (`SELMIX_TRACEBACK=1` shows it): the command line (an unknown flag or config field, a
value of the wrong type, a config file or variant that cannot be loaded), an invalid config
(nothing was computed), bad data (an empty folder, an unreadable image, mixed image sizes, a class
smaller than requested), a workdir that cannot be used (a file, not writable, in use, or holding
another run: use a new --workdir, or --restart to delete that run), a checkpoint of another model,
or a step that ran out of device memory (names the batch size field to lower); 3 the training
diverged (a NaN/inf loss or state: the message names the stage, step, learning rate and the last
good checkpoint, which is kept; no summary is written).
"""

import functools
import importlib
import importlib.util
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from selmix_jax import errors

jax.config.config_with_absl()

EXIT_USER_ERROR = 2
EXIT_CONFIG = EXIT_USER_ERROR
EXIT_DIVERGED = 3


def exit_if_unknown_field(error: Exception, argv: list[str]) -> None:
  """Exits (status 2) naming the `--config.<path>=...` override that `error` is about.

  ml_collections reports an override of a field the config lacks as a bare KeyError or
  AttributeError from deep inside absl's parsing (of `--config`, or of the default config when
  `--config` is not given). Returns if no override matches the missing key.
  """
  text = str(error)  # The missing key, quoted and escaped, maybe with a "Did you mean".
  names = re.findall(r"[A-Za-z_]\w*", text.replace("\\n", " "))
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv[1:]:
    path = arg[2:].split("=", 1)[0]
    if names and arg.startswith("--config.") and names[0] in path.split("."):
      hint = f" Did you mean {suggestion.group(1)!r}?" if suggestion else ""
      print(f"Invalid config: {arg}: the config has no field {path!r}.{hint}", file=sys.stderr)
      sys.exit(EXIT_CONFIG)


def exit_on_user_error(fn, *args):
  """Calls `fn(*args)`; a user's mistake ends the process: one line on stderr, exit status 2.

  A user's mistake is an `errors.UserError` (config, data, workdir, checkpoint, out of device
  memory) or an error of absl's flag parsing (an unknown flag, a value of the wrong type, a
  config file or variant that raises: ml_collections puts that traceback into the message, and
  only its last line is kept). With `SELMIX_TRACEBACK=1` in the environment the error is raised
  instead, with its traceback.
  """
  try:
    return fn(*args)
  except (errors.UserError, flags.Error) as e:
    if os.environ.get(errors.ENV_TRACEBACK) == "1":
      raise
    if isinstance(e, errors.UserError):
      line = errors.one_line(e)
    else:
      text = str(e)
      lines = [part.strip() for part in text.splitlines() if part.strip()]
      flag = lines[0].removeprefix("flag ").split(": ", 1)[0]
      if "Error whilst parsing config file" in text:  # The config file's own error, last line.
        line = f"Invalid config: {flag}: {re.sub(r'^[A-Za-z_.]*Error: ', '', lines[-1])}"
      elif flag.startswith("--config"):
        line = f"Invalid config: {' '.join(lines).removeprefix('flag ')}"
      else:
        line = f"Invalid command line: {' '.join(lines)} (--helpfull lists the flags)."
    print(line, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; errors as one line (`exit_on_user_error`, `exit_if_unknown_field`)."""
  try:
    return exit_on_user_error(flags.FLAGS, argv)
  except (AttributeError, KeyError) as e:
    exit_if_unknown_field(e, argv)
    raise


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config",
      os.path.join(
          os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
      ),
      "ml_collections config file (`path.py` or `path.py:variant`).",
      lock_config=True,
  )
except (AttributeError, KeyError) as e:  # The default config, overridden from sys.argv.
  exit_if_unknown_field(e, sys.argv)
  raise
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Output and checkpoint directory.")
_RESTART = flags.DEFINE_bool(
    "restart", False,
    "Delete the run already in --workdir (the checkpoints, summaries, tables, plots and "
    "TensorBoard files selmix-jax wrote there; nothing else) and start this one afresh.",
)
_IMPORTS_HELP = (
    "Module to import before the config is read (repeatable), e.g. one that registers an "
    "objective, model, pair strategy or data set."
)
_IMPORTS = flags.DEFINE_multi_string("imports", [], _IMPORTS_HELP)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    os.path.join("~", ".cache", "selmix_jax", "jax_compilation_cache"),
    "JAX's persistent compilation cache: runs of one model and data shape (every fine-tuning run "
    "from one checkpoint) load their compiled steps instead of compiling them again. '' disables "
    "it; JAX_COMPILATION_CACHE_DIR, when set, wins.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("SELMIX_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() with the cluster's auto-detection (TPU pods, SLURM, ...).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process without auto-detection)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with the above).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")



def import_user_modules(argv: list[str]) -> list[str]:
  """Imports the `--imports` modules of `argv`, before absl parses `--config`.

  absl reads the config file while it parses the command line, so the modules a config relies on
  are imported from a first pass over `--imports` only.
  """
  early = flags.FlagValues()
  flags.DEFINE_multi_string("imports", [], _IMPORTS_HELP, flag_values=early)
  early(argv, known_only=True)
  for name in early.imports:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise errors.UserError(f"--imports={name}: cannot import it ({e}).") from e
  return list(early.imports)


def _loaded_config() -> ml_collections.ConfigDict:
  """The --config value; a `train.ConfigPathError` naming the file when it could not be loaded
  (config_flags defers that error to the first use of the config)."""
  config = _CONFIG.value
  try:
    config.keys()
  except OSError as e:
    from selmix_jax import train  # pylint: disable=g-import-not-at-top

    reason = re.search(r"\[Errno \d+\] (.*)", str(e))  # Past config_flags' own preamble.
    raise train.ConfigPathError(
        f"{flags.FLAGS['config'].serialize()}: {reason.group(1) if reason else e}"
    ) from e
  return config


def _quiet_library_info(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter from the log; its warnings and errors still show."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_backend_probe(record: std_logging.LogRecord) -> bool:
  """Drops JAX's INFO that a platform it probes is absent ("Unable to initialize backend
  'tpu'"): noise on every GPU or CPU run, before anything else is logged."""
  return record.levelno >= std_logging.WARNING or "Unable to initialize backend" not in str(
      record.msg
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  std_logging.getLogger("absl").addFilter(_quiet_library_info)
  std_logging.getLogger("jax._src.xla_bridge").addFilter(_quiet_backend_probe)
  if _COMPILATION_CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILATION_CACHE.value))
    # A size limit turns on JAX's file lock (the `filelock` package, in the train extra), so
    # concurrent runs sharing the cache are safe.
    try:
      import filelock  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

      jax.config.update("jax_compilation_cache_max_size", 4 << 30)
    except ImportError:
      logging.warning(
          "The filelock package is not installed: the compilation cache %s has no size limit "
          "and no lock (runs sharing it at once may fail); pip install filelock.",
          _COMPILATION_CACHE.value,
      )
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError(
          "--coordinator_address, --num_processes and --process_id go together (or use "
          "--distributed alone for the cluster's auto-detection)."
      )
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  from selmix_jax import train  # pylint: disable=g-import-not-at-top

  from selmix_jax import loop  # pylint: disable=g-import-not-at-top

  # `train_and_evaluate` logs the config only once it, the workdir and the data are checked:
  # a mistake in any of them prints its line after at most a few one-line INFO records.
  config = exit_on_user_error(_loaded_config)
  try:
    exit_on_user_error(
        lambda: train.train_and_evaluate(config, _WORKDIR.value, restart=_RESTART.value)
    )
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(128 + e.signum)  # What a process killed by that signal reports.
  except loop.Diverged as e:
    logging.error("%s", e)
    sys.exit(EXIT_DIVERGED)


# ------------------------------------------------------------------------------------ --help
# `--help` prints what a run can be told, generated from the config (`base.field_docs()`) and
# the registries, so it never drifts; `--helpfull` stays absl's list of every flag.

_HELP_ARGS = ("--help", "-help", "-h", "-?")


def wants_help(argv: list[str]) -> bool:
  """Whether `argv` asks for `--help` (absl's own `--helpfull` and `--helpshort` stay absl's)."""
  return any(arg in _HELP_ARGS for arg in argv[1:])


def _config_arg(argv: list[str]) -> str:
  """The `--config` value of `argv`, or the default config file."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return _shown_path(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"))


def _shown_path(path: str) -> str:
  """`path` relative to the working directory when it is below it."""
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def _load_for_help(config_arg: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config, what it is): the `--config` file (and variant), or base.py's defaults if that
  does not load."""
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  path, _, variant = config_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("selmix_help_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    return config, f"values of {_shown_path(path)}{':' + variant if variant else ''}"
  except Exception as e:  # pylint: disable=broad-except
    return base.get_config(), f"configs/base.py defaults ({config_arg} did not load: {e})"


def _first_doc_line(path: str) -> str:
  import ast  # pylint: disable=g-import-not-at-top

  try:
    with open(path, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError):
    return ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def help_text(argv: list[str]) -> str:
  """The `--help` text: usage, every config field with its value and meaning, the objectives
  (with aliases), models, data sets, pair strategies, setting files and this script's flags."""
  import glob  # pylint: disable=g-import-not-at-top
  import textwrap  # pylint: disable=g-import-not-at-top

  from selmix_jax import data  # pylint: disable=g-import-not-at-top
  from selmix_jax import models  # pylint: disable=g-import-not-at-top
  from selmix_jax import objectives  # pylint: disable=g-import-not-at-top
  from selmix_jax import pairs  # pylint: disable=g-import-not-at-top
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  config, source = _load_for_help(_config_arg(argv))
  wrap = functools.partial(textwrap.fill, width=100, break_on_hyphens=False)
  out = [
      "Runs a selmix-jax job: pre-training and/or SelMix fine-tuning for a non-decomposable",
      "objective, ending with a before/after table (results.md) in the workdir.",
      "",
      "Usage: python launch/main.py [--config=configs/<setting>.py[:<variant>]] [--workdir=DIR]",
      "                             [--config.<field>=<value> ...] [--imports=my_pkg.my_module]",
      "",
      wrap("<variant>: 'pretrain' or an objective name (below), which fine-tunes for it; "
           "configs/default.py (the config without --config) also takes 'tiny' and 'tiny_ssl', "
           "and parts joined by ',' ('tiny,gmean'). Or set the objective of any config with "
           "--config.objective.name=<name>."),
      "",
      wrap(f"Config fields ({source}; `--config=<file> --help` shows another config's); set "
           "any with --config.<field>=<value>:"),
  ]
  for field, meaning in base.field_docs().items():
    node = config
    for part in field.split("."):
      node = node[part]
    value = repr(node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node)
    hparam = field.rpartition(".")[2]
    hp_default = objectives.DEFAULT_HPARAMS.get(hparam)
    if field.startswith("objective.hparams.") and node is None and hp_default is not None:
      value += f" (= {hp_default!r})"
    out.append(f"  {field} = {value}")
    out.append(textwrap.fill(meaning, width=100, initial_indent=" " * 6,
                             subsequent_indent=" " * 6, break_on_hyphens=False))
  aliases = ", ".join(f"{a} -> {n}" for a, n in sorted(objectives.aliases().items()))
  out += [
      "",
      "Objectives (config.objective.name, or the config variant :<name>):",
      wrap(", ".join(objectives.names()), initial_indent="  ", subsequent_indent="  "),
      f"  aliases: {aliases}",
      "Models (config.model.name):",
      wrap(", ".join(models.names()), initial_indent="  ", subsequent_indent="  "),
      "Data sets (config.data.name; your own images: image_folder, README 'Your own "
      "long-tailed data'):",
      wrap(", ".join(data.names()), initial_indent="  ", subsequent_indent="  "),
      "Pair strategies (config.selmix.pairs):",
      wrap(", ".join(pairs.names()), initial_indent="  ", subsequent_indent="  "),
      "",
      "Settings (--config=configs/<file>; each file's docstring has its commands):",
  ]
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  for path in sorted(glob.glob(os.path.join(configs_dir, "*.py"))):
    name = os.path.basename(path)
    if name not in ("__init__.py", "base.py"):
      out.append(wrap(f"{name}: {_first_doc_line(path)}", initial_indent="  ",
                      subsequent_indent="      "))
  out += ["", "Flags of this script:"]
  for flag in sorted(flags.FLAGS.get_flags_for_module(sys.modules[__name__]),
                     key=lambda f: f.name):
    default = repr(_config_arg([])) if flag.name == "config" else flag.default_as_str
    meaning = " ".join(flag.help.split())
    out.append(wrap(f"--{flag.name} (default {default}): {meaning}",
                    initial_indent="  ", subsequent_indent="      "))
  out += [
      "  --helpfull: every flag, absl's and JAX's (--jax_platforms=cpu, --jax_debug_nans, ...)",
      "",
  ]
  return "\n".join(out)


if __name__ == "__main__":
  exit_on_user_error(import_user_modules, sys.argv)
  if wants_help(sys.argv):
    print(help_text(sys.argv))
    sys.exit(0)
  app.run(main, flags_parser=parse_flags)

r"""Our SelMix fine-tuning step beside the authors' PyTorch step, ms per step (issue 23's table).

Same network (WRN-28-2, K = 10), batch of 64 pairs (x1, x2), one device, a fresh host batch
every step (moved to the device inside the timed step), in one run:

- ours: `steps.selmix_step` as `step_bench.bench_model` builds and times it (pmapped over one
  device, state donated; weak augmentation and normalisation of the uint8 batch inside the
  step), 2 passes and fused, float32 and bfloat16 (`models.get(..., dtype=jnp.bfloat16)`).
- the authors': built from a checkout of their release given by `--release` (never committed),
  by importing its modules: `models/nets/wrn.py`'s `build_WideResNet` (their fine-tuning
  configs: leaky slope 0.1, BatchNorm momentum 0), `models/wrapper.py`'s `TimmModelWrapper`
  (two backbone passes, features mixed with w ~ U[0.6, 1], then the head), `train_utils.py`'s
  `get_finetune_SGD` (backbone lr/10, BatchNorm frozen, weight decay 5e-4) with the cosine
  schedule, and the body of `finetuning/selmix_ssl.py`'s training loop (`.cuda()` of the host
  batch, `cross_entropy(logits / T)`, backward, optimizer and scheduler steps, zero_grad),
  with BatchNorm and cuDNN set up as `trainMetricOpt.py` does (momentum 0,
  `track_running_stats=False`; `cudnn.deterministic` and `cudnn.benchmark`). Their script wraps
  the model in `DataParallel` when `gpu` is null; that wrapper has no `pre_logits`, which their
  refresh calls, so their runs must have set a GPU: the model is not wrapped here.
  Variants: eager float32 (as released), `torch.compile` of the wrapper (CUDA only: it traces
  their `Tensor.cuda()` call), eager under bfloat16 `torch.autocast`. Their host batches are
  float32 NCHW tensors, already augmented (their data loader's work, not timed); ours are uint8
  and augmented in the step.

Columns: "synced" is the median of per-step times with a device sync after every step;
"pipelined" is `--steps` steps dispatched back to back with one sync at the end, per step;
"first call" is the first step (compilation included). Rows print as they are measured, our
float32 and their as-released step first. After the table: our validation pass
(`step_bench.bench_refresh`, the bulk of a refresh at K = 10). The loop's overhead is
`benchmarks/loop_bench.py`'s (where it exists; `device_session.sh benches` runs both).

Import-time dependencies of the release that the timed code never calls (`timm` in
`models/wrapper.py`; `wandb`, tensorboard, matplotlib and seaborn in `train_utils.py`) are
replaced by empty stand-ins when they are not installed; the run says which. On a machine
without CUDA (the smoke size) `Tensor.cuda()`, which their wrapper calls on the mix weights,
returns the tensor as is.

Extract the release into the repo's ignored `.release/` (once; `git` of a fetched snapshot):

  mkdir -p .release/SelMix
  git --git-dir=/work/.mirror/val-iisc+SelMix/repo archive HEAD | tar -x -C .release/SelMix
  grep -qx '/.release/' .git/info/exclude || echo '/.release/' >> .git/info/exclude

then, on the GPU machine (carry `.release` with the working tree):

  python benchmarks/gpu_step_vs_release.py --release=.release/SelMix

CPU smoke (WRN-10-1, 4 pairs, a few steps; what tests/test_gpu_step_bench.py runs without
`--release`):

  python benchmarks/gpu_step_vs_release.py --smoke --release=.release/SelMix
"""

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OURS = {  # our row label -> (step_bench variant, dtype)
    "ours, SelMix 2 passes, f32": ("selmix (2 passes)", jnp.float32),
    "ours, SelMix fused, f32": ("selmix (fused)", jnp.float32),
    "ours, SelMix 2 passes, bf16": ("selmix (2 passes)", jnp.bfloat16),
    "ours, SelMix fused, bf16": ("selmix (fused)", jnp.bfloat16),
}
_THEIRS = {  # --torch_variants name -> row label
    "eager": "authors', eager f32 (as released)",
    "compile": "authors', torch.compile f32",
    "bf16": "authors', eager bf16 autocast",
}
_RELEASE_FILES = ("models/nets/wrn.py", "models/wrapper.py", "train_utils.py")
# The release's fine-tuning configs (configs/cifar10/*/MinRecall.yaml and the others).
_RELEASE_HPARAMS = dict(
    lr=3e-4, weight_decay=5e-4, T=1.0, num_train_iter=10_000, leaky_slope=0.1, bn_momentum=0.0
)


# ------------------------------------------------------------------------------------------
# Ours.


_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def time_ours(*, depth, widen_factor, batch, num_steps, warmup, dtypes=("f32", "bf16")):
  """Rows {'step', 'synced_ms', 'pipelined_ms', 'first_s'} of our SelMix step variants."""
  rows = []
  for dtype in (_DTYPES[d] for d in dtypes):
    labels = {v: label for label, (v, d) in _OURS.items() if d == dtype}
    timed = step_bench.bench_model(
        "wrn",
        batch=batch,
        num_steps=num_steps,
        warmup=warmup,
        only=set(labels),
        pipelined=True,
        depth=depth,
        widen_factor=widen_factor,
        dtype=dtype,
    )
    for r in timed:
      rows.append(
          {
              "step": labels[r["step"]],
              "synced_ms": r["ms"],
              "pipelined_ms": r["pipelined_ms"],
              "first_s": r["compile_s"],
          }
      )
  order = list(_OURS)
  return sorted(rows, key=lambda r: order.index(r["step"]))


# ------------------------------------------------------------------------------------------
# The authors'.


class _Unavailable:
  """Stands for a class of a package that is not installed; fails only if used."""

  def __init__(self, *args, **kwargs):
    raise RuntimeError("a stand-in for a package that is not installed was called")


# What the release's imported modules import at module level without the timed code using it.
_IMPORT_ONLY = (
    "timm",  # models/wrapper.py
    "wandb",  # train_utils.py, from here on
    "torch.utils.tensorboard.writer",  # needs the tensorboard package
    "matplotlib.pyplot",
    "seaborn",
)


def _stand_in_if_missing(name):
  """Puts an empty module (any attribute: `_Unavailable`) for `name` if it cannot be imported.

  Returns:
    Whether it did.
  """
  try:
    importlib.import_module(name)
    return False
  except ImportError:
    pass

  def getattr_(attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return _Unavailable

  parts = name.split(".")
  for i in range(len(parts)):
    full = ".".join(parts[: i + 1])
    try:
      parent = importlib.import_module(full) if i < len(parts) - 1 else None
    except ImportError:
      parent = None
    if parent is None:
      module = types.ModuleType(full)
      module.__getattr__ = getattr_
      sys.modules[full] = module
      if i:
        setattr(sys.modules[".".join(parts[:i])], parts[i], module)
  return True


def import_release(path):
  """The release's modules `wrn`, `wrapper`, `train_utils`, imported from the checkout `path`.

  Returns:
    (namespace with the three modules, names of the packages replaced by stand-ins).

  Raises:
    FileNotFoundError: `path` lacks one of the release's files.
  """
  path = os.path.abspath(path)
  for name in _RELEASE_FILES:
    if not os.path.isfile(os.path.join(path, name)):
      raise FileNotFoundError(
          f"--release={path}: no {name}; expected a checkout of val-iisc/SelMix (see this "
          "script's docstring for extracting one)."
      )
  stubbed = [name for name in _IMPORT_ONLY if _stand_in_if_missing(name)]
  for name in list(sys.modules):  # another checkout's, imported earlier in this process
    if name.split(".")[0] in ("models", "train_utils"):
      del sys.modules[name]
  sys.path.insert(0, path)
  try:
    release = types.SimpleNamespace(
        wrn=importlib.import_module("models.nets.wrn"),
        wrapper=importlib.import_module("models.wrapper"),
        train_utils=importlib.import_module("train_utils"),
    )
  finally:
    sys.path.remove(path)
  for module in vars(release).values():
    if not os.path.abspath(module.__file__).startswith(path + os.sep):
      raise ImportError(f"{module.__name__} came from {module.__file__}, not from {path}.")
  return release, stubbed


@contextlib.contextmanager
def _cuda_is_identity(torch):
  """Without CUDA, `Tensor.cuda()` (called by their wrapper) returns the tensor unchanged."""
  if torch.cuda.is_available():
    yield
    return
  original = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    yield
  finally:
    torch.Tensor.cuda = original


def build_release_step(release, variant, *, depth, widen_factor, device, num_classes=10):
  """The authors' fine-tuning step, `step(x1, y1, x2)` on host tensors, for one variant."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  h = _RELEASE_HPARAMS
  net = release.wrn.build_WideResNet(
      depth=depth,
      widen_factor=widen_factor,
      bn_momentum=h["bn_momentum"],
      leaky_slope=h["leaky_slope"],
      dropRate=0.0,
  ).build(num_classes)
  model = release.wrapper.TimmModelWrapper(net, 0.6)
  for module in model.model.modules():  # as trainMetricOpt.py sets BatchNorm up
    if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
      module.momentum = h["bn_momentum"]
      module.track_running_stats = False
  model.to(device).train()
  optimizer = release.train_utils.get_finetune_SGD(  # on the wrapper, as theirs
      model, "SGD", lr=h["lr"], weight_decay=h["weight_decay"], freeze_backbone=False
  )
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
      optimizer, h["num_train_iter"], eta_min=0
  )
  forward = torch.compile(model) if variant == "compile" else model

  def autocast():
    if variant == "bf16":
      return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def step(x1, y1, x2):  # the body of SelMixSSL.train's loop
    x1, y1, x2 = x1.to(device), y1.to(device), x2.to(device)
    with autocast():
      logits = forward(x1, x2)
      loss = F.cross_entropy(logits / h["T"], y1, reduction="mean")
    loss.backward()
    optimizer.step()
    scheduler.step()
    model.zero_grad()
    optimizer.zero_grad()

  return step


def time_release(release, variants, *, depth, widen_factor, batch, num_steps, warmup, device):
  """Rows {'step', 'synced_ms', 'pipelined_ms', 'first_s'} of the authors' step variants."""
  import torch  # pylint: disable=g-import-not-at-top

  device = torch.device(device)
  # trainMetricOpt.py sets both (deterministic first, benchmark once the model is on the GPU).
  torch.backends.cudnn.deterministic = True
  torch.backends.cudnn.benchmark = True
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  generator = torch.Generator().manual_seed(0)
  batches = [
      (
          torch.randn(batch, 3, 32, 32, generator=generator),
          torch.randint(0, 10, (batch,), generator=generator),
          torch.randn(batch, 3, 32, 32, generator=generator),
      )
      for _ in range(num_steps + warmup)
  ]
  rows = []
  with _cuda_is_identity(torch):
    for variant in variants:
      step = build_release_step(
          release, variant, depth=depth, widen_factor=widen_factor, device=device
      )
      t0 = time.perf_counter()
      step(*batches[0])
      sync()
      first_s = time.perf_counter() - t0
      for i in range(1, warmup):
        step(*batches[i])
      sync()
      synced = []
      for i in range(warmup, warmup + num_steps):
        t0 = time.perf_counter()
        step(*batches[i])
        sync()
        synced.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for i in range(warmup, warmup + num_steps):
        step(*batches[i])
      sync()
      pipelined = (time.perf_counter() - t0) / num_steps
      rows.append(
          {
              "step": _THEIRS[variant],
              "synced_ms": 1e3 * statistics.median(synced),
              "pipelined_ms": 1e3 * pipelined,
              "first_s": first_s,
          }
      )
  return rows


# ------------------------------------------------------------------------------------------


def _parser():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--release", default=None, help="checkout of val-iisc/SelMix")
  parser.add_argument("--batch", type=int, default=64, help="pairs per step")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--depth", type=int, default=28)
  parser.add_argument("--widen_factor", type=int, default=2)
  parser.add_argument("--dtypes", default="f32,bf16", help="our rows: of f32,bf16")
  parser.add_argument("--torch_variants", default=None, help="of eager,compile,bf16")
  parser.add_argument("--torch_device", default=None, help="default: cuda if available")
  parser.add_argument("--val_size", type=int, default=10_000)
  parser.add_argument("--eval_batch", type=int, default=500)
  parser.add_argument("--no_refresh", action="store_true", help="skip the validation pass")
  parser.add_argument(
      "--smoke", action="store_true", help="WRN-10-1, 4 pairs, 3 steps, eager and bf16 only"
  )
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.smoke:
    args.batch, args.steps, args.warmup = 4, 3, 1
    args.depth, args.widen_factor = 10, 1
    args.val_size, args.eval_batch = 64, 32
    args.torch_variants = args.torch_variants or "eager,bf16"
  variants = (args.torch_variants or ",".join(_THEIRS)).split(",")
  dtypes = args.dtypes.split(",")
  for flag, given, known in (("torch_variants", variants, _THEIRS), ("dtypes", dtypes, _DTYPES)):
    if set(given) - set(known):
      raise SystemExit(
          f"--{flag}: unknown {sorted(set(given) - set(known))}; expected some of {list(known)}."
      )
  release = device = None
  notes = ["authors' rows: skipped (no --release)"]
  if args.release:  # before any timing: fail early
    import torch  # pylint: disable=g-import-not-at-top

    release, stubbed = import_release(args.release)
    device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "compile" in variants and not device.startswith("cuda"):
      raise SystemExit(
          "--torch_variants=compile needs CUDA: their wrapper calls Tensor.cuda(), which "
          "torch.compile traces as such (the CPU stand-in for it does not apply there)."
      )
    notes = [
        f"authors' step: torch {torch.__version__} on {device}, release {args.release}"
        + (f"; stand-ins for uninstalled {', '.join(stubbed)}" if stubbed else "")
    ]
  print(
      f"WRN-{args.depth}-{args.widen_factor}, K = 10, {args.batch} pairs a step, "
      f"{args.steps} steps after {args.warmup} warm-up; jax {jax.__version__} on "
      f"{jax.devices()[0].device_kind}"
  )
  for note in notes:
    print(note)
  print()
  print("| step | synced ms (median) | pipelined ms | first call s |")
  print("|---|---:|---:|---:|")
  # Rows print as they are measured, the comparisons that matter most first, so that a run cut
  # short by a time limit still shows them.
  plan = [("ours", "f32"), ("theirs", "eager"), ("ours", "bf16"), ("theirs", "bf16")]
  plan += [("theirs", "compile")]
  rows = []
  for side, what in plan:
    if side == "ours" and what in dtypes:
      new_rows = time_ours(
          depth=args.depth,
          widen_factor=args.widen_factor,
          batch=args.batch,
          num_steps=args.steps,
          warmup=args.warmup,
          dtypes=(what,),
      )
    elif side == "theirs" and release is not None and what in variants:
      new_rows = time_release(
          release,
          [what],
          depth=args.depth,
          widen_factor=args.widen_factor,
          batch=args.batch,
          num_steps=args.steps,
          warmup=args.warmup,
          device=device,
      )
    else:
      continue
    for r in new_rows:
      print(
          f"| {r['step']} | {r['synced_ms']:.2f} | {r['pipelined_ms']:.2f} "
          f"| {r['first_s']:.1f} |",
          flush=True,
      )
    rows += new_rows
  print()
  if not args.no_refresh:
    seconds = step_bench.bench_refresh(
        "wrn",
        val_size=args.val_size,
        eval_batch=args.eval_batch,
        depth=args.depth,
        widen_factor=args.widen_factor,
    )
    print(
        f"ours, validation pass of a refresh ({args.val_size} images, batch "
        f"{args.eval_batch}): {1e3 * seconds:.1f} ms"
    )
  assert all(math.isfinite(r[k]) for r in rows for k in ("synced_ms", "pipelined_ms"))
  return rows


if __name__ == "__main__":
  main()

"""What a run leaves behind for people: metric tables, `summary.json` and PNG plots.

Host-side only (NumPy + matplotlib with the Agg backend); nothing here runs under `jit`.
"""

import glob
import io
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from selmix_jax import metrics
from selmix_jax import sampling


def to_python(tree: Any) -> Any:
  """Converts arrays (and NaN) inside a nested structure to JSON-friendly Python values."""
  if isinstance(tree, Mapping):
    return {str(k): to_python(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_python(v) for v in tree]
  if hasattr(tree, "tolist"):
    tree = np.asarray(tree).tolist()
    return to_python(tree) if isinstance(tree, list) else _scalar(tree)
  return _scalar(tree)


def _scalar(x):
  if isinstance(x, float) and not np.isfinite(x):
    return None  # JSON has no NaN; absent classes are reported as null.
  return x


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Writes JSON atomically (temporary file + rename), so a crash never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(to_python(payload), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save_json(workdir: str, name: str, payload: Mapping[str, Any]) -> None:
  """Process 0 writes `<workdir>/<name>` atomically (the other processes write nothing)."""
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, name), payload)


def load_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def flat_scalars(prefix: str, summary: Mapping[str, Any]) -> dict[str, float]:
  """The scalar entries of a metric summary, prefixed (`test/min_recall`, ...)."""
  return {f"{prefix}/{k}": float(v) for k, v in summary.items() if np.ndim(v) == 0}


# A refresh record's size limit, and its [K, K] arrays that may be stored at reduced precision.
HISTORY_MAX_BYTES = 1_000_000
_REDUCIBLE = ("pair_probs", "gain")
# Reduced forms, coarsest last: (P's form, G's form). 'f16': float16 of x / max|x|; 'i8': int8 of
# round(127 x / max|x|).
_REDUCED_FORMS = (("f16", "f16"), ("f16", "i8"))


def save_refresh(
    workdir: str,
    step: int,
    record: Mapping[str, np.ndarray],
    *,
    max_bytes: int = HISTORY_MAX_BYTES,
) -> int:
  """Writes one SelMix refresh (P, G, multipliers, ...) to `selmix_history/refresh_<step>.npz`.

  A compressed `.npz`, exact when it fits in `max_bytes`. Otherwise `pair_probs` and `gain` are
  stored at the first reduced precision that fits (`load_history` decodes both to float32):
    1. both as float16 of `x / max|x|`: relative error <= 2^-11 (4.9e-4) where
       |x| >= 6.1e-5 max|x|, absolute error <= 3e-8 max|x| below;
    2. P as in 1, G as int8 of `round(127 G / max|G|)`: absolute error <= max|G| / 254.
  Exact records fit up to K ~ 300 (two K x K float32 arrays, 0.7 MB raw). At K = 1000 a peaked P
  (SelMix's, T = 0.1) with an incompressible G takes ~0.87 MB in form 2; only a P spread over
  ~10^5 pairs (which does not compress) can still exceed the limit, with a warning.

  Returns:
    The size of the written file in bytes.
  """
  directory = os.path.join(workdir, "selmix_history")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"refresh_{step:07d}.npz")
  data = _compressed_npz(record)
  for forms in _REDUCED_FORMS:
    if len(data) <= max_bytes:
      break
    reduced = dict(record)
    for name, form in zip(_REDUCIBLE, forms):
      if name in reduced:
        reduced.update(_reduce(reduced.pop(name), name, form))
    data = _compressed_npz(reduced)
  if len(data) > max_bytes:
    logging.warning(
        "SelMix history record of step %d takes %d bytes (limit %d): P is spread too widely "
        "to compress.", step, len(data), max_bytes,
    )
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)


def _compressed_npz(record: Mapping[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **record)
  return buffer.getvalue()


def _reduce(x: np.ndarray, name: str, form: str) -> dict[str, np.ndarray]:
  """`{name__<form>: quantised x, name__scale: float32 scale}` (`_expand` inverts it)."""
  x = np.asarray(x, np.float32)
  peak = float(np.max(np.abs(x))) if x.size else 0.0
  peak = peak if peak > 0 and np.isfinite(peak) else 1.0
  if form == "f16":
    return {f"{name}__f16": (x / peak).astype(np.float16), f"{name}__scale": np.float32(peak)}
  return {
      f"{name}__i8": np.round(x * (127.0 / peak)).astype(np.int8),
      f"{name}__scale": np.float32(peak / 127.0),
  }


def _expand(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for key in [k for k in record if k.endswith("__scale")]:
    name = key[: -len("__scale")]
    scale = record.pop(key)
    quantised = record.pop(f"{name}__f16", None)
    if quantised is None:
      quantised = record.pop(f"{name}__i8")
    record[name] = quantised.astype(np.float32) * scale
  return record


def load_history(workdir: str) -> list[dict[str, np.ndarray]]:
  """All refresh records of a SelMix run (`save_refresh`), in step order, P and G as float32
  (decoded from reduced precision where they were stored so)."""
  files = sorted(glob.glob(os.path.join(workdir, "selmix_history", "refresh_*.npz")))
  records = []
  for f in files:
    with np.load(f) as stored:
      records.append(_expand(dict(stored)))
  return records


def metrics_table(columns: Mapping[str, Mapping[str, Any]], *, scale: float = 100.0) -> str:
  """A Markdown table: one row per scalar metric, one column per run (e.g. before / after).

  Args:
    columns: column title -> metric dict (as returned by `metrics.summary`).
    scale: multiply values by this when printing (metrics are in [0, 1]).
  """
  titles = list(columns)
  lines = [
      "| metric | " + " | ".join(titles) + " |",
      "|---|" + "---:|" * len(titles),
  ]
  for name in metrics.SCALAR_METRICS:
    cells = []
    for title in titles:
      value = columns[title].get(name)
      cells.append("—" if value is None else f"{scale * float(value):.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


_MANY_CLASSES = 30  # Above this, one bar group per class is no longer readable.


def plot_recalls(
    path: str,
    recalls: Mapping[str, Sequence[float]],
    *,
    class_names: Sequence[str] | None = None,
    head_mask: Sequence[bool] | None = None,
    title: str = "Per-class recall",
    num_worst: int = 20,
) -> list[str]:
  """Per-class recall of one or more runs (e.g. before / after), readable at any K.

  Up to 30 classes: one bar group per class, named, with the head/tail split marked. More
  classes: two panels of fixed size, (left) every class's recall in class order — classes are
  ordered from most to least frequent, so the tail is on the right of the marked split — and
  (right) the `num_worst` classes of the last run with their names and every run's recall.

  Args:
    path: output PNG.
    recalls: run name -> `[K]` recalls in [0, 1] (NaN for an absent class).
    class_names: K names (default '0'..'K-1').
    head_mask: `[K]` bool head classes (default: the first `int(0.9 K)`, SPEC §2).
    title: figure title.
    num_worst: classes in the right panel when K is large.

  Returns:
    The class names shown by name: all of them, or the worst ones in the order drawn.
  """
  plt = _pyplot()
  runs = list(recalls)
  values = {run: np.asarray(recalls[run], dtype=float) * 100.0 for run in runs}
  num_classes = len(values[runs[0]])
  names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
  head = np.asarray(
      metrics.default_head_mask(num_classes) if head_mask is None else head_mask, bool
  )
  num_head = int(head.sum())
  contiguous_head = bool(head[:num_head].all())
  if num_classes <= _MANY_CLASSES:
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * num_classes + 2), 3.8))
    x = np.arange(num_classes)
    for r, run in enumerate(runs):
      ax.bar(x + (r - (len(runs) - 1) / 2) * width, np.nan_to_num(values[run]), width, label=run)
    long_names = num_classes > 10 or max(len(n) for n in names) > 5
    ax.set_xticks(
        x, names, rotation=35 if long_names else 0, ha="right" if long_names else "center"
    )
    _mark_tail(ax, head, num_head, contiguous_head)
    ax.set_xlabel("class (in class order; tail classes shaded)")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    shown = names
  else:
    fig, (ax, worst_ax) = plt.subplots(
        1, 2, figsize=(13.0, 5.0), gridspec_kw={"width_ratios": [3, 2]}
    )
    x = np.arange(num_classes)
    for run in runs:
      ax.plot(x, values[run], marker=".", ms=3, lw=0.8, label=run)
    _mark_tail(ax, head, num_head, contiguous_head)
    ax.set_xlabel("class index, in class order (tail classes shaded)")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, num_classes - 0.5)
    ax.set_title(f"{title}: all {num_classes} classes")
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)
    last = np.where(np.isnan(values[runs[-1]]), np.inf, values[runs[-1]])
    order = np.argsort(last, kind="stable")[:num_worst][::-1]  # Worst at the top.
    height = 0.8 / max(1, len(runs))
    y = np.arange(len(order))
    for r, run in enumerate(runs):
      offset = y + (r - (len(runs) - 1) / 2) * height
      worst_ax.barh(offset, np.nan_to_num(values[run][order]), height, label=run)
    for i, k in enumerate(order):  # The values, so that a 0 % bar is still read as one.
      text = " → ".join(f"{values[run][k]:.0f}" for run in runs)
      worst_ax.text(101, y[i], text, va="center", fontsize="x-small")
    shown = [f"{names[k]} ({'tail' if not head[k] else 'head'})" for k in order]
    worst_ax.set_yticks(y, shown, fontsize="small")
    worst_ax.set_xlim(0, 100)
    worst_ax.set_xlabel("recall (%)")
    at_zero = int(np.sum(last <= 0))
    ties = f"; {at_zero} classes are at 0 %" if at_zero > len(order) else ""
    worst_ax.set_title(f"the {len(order)} worst classes of {runs[-1]!r}{ties}", fontsize="medium")
    worst_ax.grid(axis="x", alpha=0.3)
    shown = shown[::-1]
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return shown


def _mark_tail(ax, head, num_head, contiguous_head) -> None:
  """Shades the tail classes (a dashed line at the split when the head comes first)."""
  if contiguous_head and 0 < num_head < len(head):
    ax.axvline(num_head - 0.5, color="k", ls="--", lw=0.8)
    ax.axvspan(num_head - 0.5, len(head) - 0.5, color="0.9", zorder=0)
    ax.text(num_head - 0.3, 97, "tail", fontsize="small", va="top")
  else:
    for k in np.flatnonzero(~head):
      ax.axvspan(k - 0.5, k + 0.5, color="0.9", zorder=0)


def plot_pair_probs(
    path: str,
    snapshots: Sequence[tuple[int, np.ndarray]],
    *,
    class_names: Sequence[str] | None = None,
    max_panels: int = 6,
) -> None:
  """Heatmaps of the pair distribution P (rows: class of x1, columns: class of x2) over time.

  Each panel is titled with its step and how concentrated P is (effective number of pairs,
  `exp` of its entropy, out of the pairs it supports); class names label the axes up to 20
  classes, otherwise ticks mark class indices (classes ordered from most to least frequent).

  Args:
    path: output PNG.
    snapshots: `(step, pair_probs [K, K])` in step order; at most `max_panels` evenly spaced
      ones are drawn (always including the last).
    class_names: K names for the axes (used when K <= 20).
    max_panels: panel limit.
  """
  plt = _pyplot()
  if not snapshots:
    return
  picks = np.unique(np.linspace(0, len(snapshots) - 1, min(max_panels, len(snapshots))).astype(int))
  chosen = [snapshots[i] for i in picks]
  vmax = max(float(np.max(p)) for _, p in chosen)
  num_classes = np.shape(chosen[0][1])[0]
  fig, axes = plt.subplots(
      1, len(chosen), figsize=(2.8 * len(chosen) + 1.4, 3.4), squeeze=False, layout="constrained"
  )
  image = None
  for ax, (step, probs) in zip(axes[0], chosen):
    probs = np.asarray(probs, np.float64)
    image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=vmax)
    spread = sampling.concentration(probs)
    ax.set_title(
        f"step {step}\n{spread['effective_pairs']:.1f} eff. pairs of {spread['support']}",
        fontsize="small",
    )
    ax.set_xlabel("class of x2 (partner)")
    if class_names is not None and num_classes <= 20:
      ticks = np.arange(num_classes)
      ax.set_xticks(ticks, list(class_names), rotation=90, fontsize="x-small")
      ax.set_yticks(ticks, list(class_names), fontsize="x-small")
  axes[0][0].set_ylabel("class of x1 (label kept)")
  fig.suptitle("SelMix pair distribution P at refreshes", fontsize="medium")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="P(i, j)")
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(
    path: str,
    steps: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
) -> None:
  """Line plot of scalar histories (validation target, per-class recalls, ...) against steps,
  with its y-axis label and title."""
  plt = _pyplot()
  many = len(curves) > 4
  fig, ax = plt.subplots(figsize=(7.5 if many else 6, 3.5))
  for name, values in curves.items():
    ax.plot(steps, values, marker="o", ms=2, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize="medium")
  if many:  # Outside the axes, so that it hides no curve.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_selmix_run(workdir: str, result: Mapping[str, Any], class_names) -> None:
  """The pictures of a fine-tuning run: per-class test recall before/after, P over time, the
  validation target per refresh and (up to 20 classes) per-class validation recall."""
  plot_recalls(
      os.path.join(workdir, "recalls.png"),
      {
          "pre-trained": result["before"]["test"]["recall"],
          result["method"]: result["after"]["test"]["recall"],
      },
      class_names=class_names,
      title="Per-class test recall",
  )
  history = load_history(workdir)
  if not history:
    return
  refresh_steps = [int(h["step"]) for h in history]
  objective = result.get("objective", "none")
  plot_pair_probs(
      os.path.join(workdir, "pair_probs.png"),
      [(step, h["pair_probs"]) for step, h in zip(refresh_steps, history)],
      class_names=class_names,
  )
  plot_curves(
      os.path.join(workdir, "refresh_curves.png"),
      refresh_steps,
      {"val target": [float(h["val_target"]) for h in history]},
      ylabel=f"validation target ({objective})" if objective != "none" else "validation target",
      title="Objective target on validation at each refresh (0-1)",
  )
  recalls = np.stack([h["val_recalls"] for h in history])
  if recalls.shape[1] <= 20:  # One line per class stays readable up to ~20 classes.
    names = list(class_names) if class_names is not None else range(recalls.shape[1])
    plot_curves(
        os.path.join(workdir, "val_recalls.png"),
        refresh_steps,
        {str(name): recalls[:, i] for i, name in enumerate(names)},
        ylabel="validation recall (0-1)",
        title="Per-class validation recall at each refresh",
    )

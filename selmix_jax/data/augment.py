"""Weak and strong (FixMatch RandAugment + Cutout) augmentation in pure JAX.

Per-example functions take a float32 image in [0, 1] of shape [H, W, C] (C = 1 or
3) and a PRNG key, and return an image of the same shape and range; the `*_batch`
wrappers `vmap` them over images [B, H, W, C] and keys [B, 2] (or typed keys [B]).
Everything is jit- and vmap-able and a pure function of `(image, key)`.

Weak augmentation crops one of two ways (`make_preprocess(..., crop=...)`, chosen by
`config.data.train_augment`): 'pad_crop' (flip + reflect-pad-4 random crop, the CIFAR recipe) or
'random_resized_crop' (ImageNet: torchvision's RandomResizedCrop, scale (0.08, 1), ratio
(3/4, 4/3), bilinear back to the input size, then the flip). Both run here, on device, per
example, from the same keys as every other draw, so a batch is the same whatever loads it and
the host only decodes. The crop is taken from the image the source stores (for ImageNet, the
shorter-side-resized centre square), not from the original file.

Keys: derive one key per example from `(base_key, step, example_index)` with
`example_keys`, so a batch is reproducible after a resume and independent of the
batch composition and the device layout.

Strong augmentation follows FixMatch (Sohn et al., 2020, Table 12): weak flip and
pad-crop first (as in FixMatch's strong transform), then 2 or 3 (uniformly) ops
drawn uniformly with replacement from the 14 ops below, each at a uniformly
random magnitude in its range, then Cutout: a square of side `cutout_frac * H`
(0.5 by default) at a uniformly random centre, filled with gray 0.5.

  op            magnitude range
  Identity, AutoContrast, Equalize   -
  Brightness, Color, Contrast, Sharpness   enhance factor in [0.05, 0.95]
  Posterize     bits in {4..8}
  Solarize      threshold in [0, 1]
  Rotate        angle in [-30, 30] degrees
  ShearX/Y      shear in [-0.3, 0.3]
  TranslateX/Y  shift in [-0.3, 0.3] of the side

Enhance ops blend with a degenerate image as PIL's ImageEnhance does (Color on one
channel is the identity); Equalize, AutoContrast and Posterize follow PIL's
ImageOps on 8-bit levels; geometric ops act about the image centre, resample
bilinearly (`warp`) and fill with gray 0.5. dm-pix supplies the flip and Solarize;
its brightness/contrast/saturation adjustments are additive or per-channel and
differ from PIL's, which FixMatch's magnitudes assume.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

GRAY = 0.5
NUM_OPS_CHOICES = (2, 3)


def example_keys(
  base_key: jax.Array,
  step: int | jax.Array,
  example_indices: jax.Array,
  *,
  stream: int | None = None,
) -> jax.Array:
  """Per-example keys `fold_in(fold_in(fold_in(base_key, step), stream), index)`.

  The one key derivation of the code base: augmentation draws depend on (base key, step,
  stream, example index) only, not on how a batch is composed or split over devices.

  Args:
    base_key: a PRNG key.
    step: training step (int or scalar array).
    example_indices: int [B] dataset indices of the examples.
    stream: a small int naming the use (so two uses of one example never share keys), or None
      for no stream fold.

  Returns:
    Keys with leading shape [B] (raw uint32 [B, 2] for raw base keys).
  """
  step_key = jax.random.fold_in(base_key, step)
  if stream is not None:
    step_key = jax.random.fold_in(step_key, stream)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(example_indices))


def normalize(
  images: jax.Array, mean: Sequence[float] | jax.Array, std: Sequence[float] | jax.Array
) -> jax.Array:
  """`(images - mean) / std` broadcast over the channel axis; [..., C] -> [..., C]."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 in [0, 255] -> float32 in [0, 1]; float inputs (feature vectors) pass unchanged."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  return images.astype(jnp.float32) / 255.0


# ---------------------------------------------------------------------------- weak


def flip_and_crop(image: jax.Array, key: jax.Array, *, pad: int = 4) -> jax.Array:
  """Random horizontal flip (p = 0.5), then a random crop of the reflect-padded image."""
  h, w, _ = image.shape
  k_flip, k_y, k_x = jax.random.split(key, 3)
  image = jnp.where(jax.random.bernoulli(k_flip), pix.flip_left_right(image), image)
  if pad == 0:
    return image
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  dy = jax.random.randint(k_y, (), 0, 2 * pad + 1)
  dx = jax.random.randint(k_x, (), 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)


RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(
  key: jax.Array,
  height: int,
  width: int,
  *,
  scale: tuple[float, float] = RRC_SCALE,
  ratio: tuple[float, float] = RRC_RATIO,
  attempts: int = 10,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The crop box of torchvision's `RandomResizedCrop.get_params`, as int32 scalars.

  Draws `attempts` candidates with area `U[scale] * height * width` and aspect (w / h)
  log-uniform in `ratio`, sides rounded; takes the first that fits in the image, at a uniform
  integer position. If none fits, the centre crop of the whole image with its aspect clamped
  to `ratio`.

  Returns:
    `(top, left, crop_height, crop_width)`.
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(
    k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = jnp.exp(log_ratio)
  crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = jnp.argmax(fits)
  # Fallback (static shapes, so plain Python): the centre crop with the aspect clamped.
  if width / height < min(ratio):
    fallback_h, fallback_w = round(width / min(ratio)), width
  elif width / height > max(ratio):
    fallback_h, fallback_w = height, round(height * max(ratio))
  else:
    fallback_h, fallback_w = height, width
  found = fits.any()
  h = jnp.where(found, crop_h[first], fallback_h)
  w = jnp.where(found, crop_w[first], fallback_w)
  top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
  top = jnp.where(found, top, (height - fallback_h) // 2)
  left = jnp.where(found, left, (width - fallback_w) // 2)
  return top, left, h, w


def _resample_axis(image: jax.Array, start, size, axis: int) -> jax.Array:
  """Linear resampling of `image[start : start + size]` along `axis` to the axis's full length.

  Pixel centres are aligned (`align_corners=False`) and samples beyond the crop's edge take the
  edge pixel, as resizing the cropped image does (PIL / torchvision bilinear). Upsampling only
  (size <= length), so no antialiasing filter is needed.
  """
  length = image.shape[axis]
  start, size = jnp.asarray(start, jnp.int32), jnp.asarray(size, jnp.int32)
  last = start + size - 1
  coords = start + (jnp.arange(length, dtype=jnp.float32) + 0.5) * (size / length) - 0.5
  coords = jnp.clip(coords, start.astype(jnp.float32), last.astype(jnp.float32))
  low = jnp.floor(coords)
  frac = coords - low
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, last)
  shape = [1] * image.ndim
  shape[axis] = length
  a, b = jnp.take(image, low, axis=axis), jnp.take(image, high, axis=axis)
  return a + frac.reshape(shape).astype(image.dtype) * (b - a)


def random_resized_crop(
  image: jax.Array,
  key: jax.Array,
  *,
  scale: tuple[float, float] = RRC_SCALE,
  ratio: tuple[float, float] = RRC_RATIO,
) -> jax.Array:
  """A `random_resized_crop_box` crop resized (bilinear) back to the image size. [H, W, C]."""
  h, w, _ = image.shape
  top, left, crop_h, crop_w = random_resized_crop_box(key, h, w, scale=scale, ratio=ratio)
  return _resample_axis(_resample_axis(image, top, crop_h, 0), left, crop_w, 1)


def flip_and_random_resized_crop(image: jax.Array, key: jax.Array) -> jax.Array:
  """ImageNet's weak view: `random_resized_crop`, then a horizontal flip (p = 0.5)."""
  k_crop, k_flip = jax.random.split(key)
  image = random_resized_crop(image, k_crop)
  return jnp.where(jax.random.bernoulli(k_flip), pix.flip_left_right(image), image)


# 'none': the weak view is the input itself (feature vectors; frozen-backbone head training).
CROPS = ("pad_crop", "random_resized_crop", "none")


def weak(image: jax.Array, key: jax.Array, *, pad: int = 4, crop: str = "pad_crop") -> jax.Array:
  """Weak augmentation. [H, W, C] -> [H, W, C].

  `crop='pad_crop'`: flip + pad-`pad` reflect random crop; 'random_resized_crop':
  `flip_and_random_resized_crop` (`pad` unused).
  """
  if crop == "random_resized_crop":
    return flip_and_random_resized_crop(image, key)
  if crop == "none":
    return image
  if crop != "pad_crop":
    raise ValueError(f"Unknown crop {crop!r}; expected one of {CROPS}.")
  return flip_and_crop(image, key, pad=pad)


# -------------------------------------------------------------------------- the ops


def _grayscale(image: jax.Array) -> jax.Array:
  if image.shape[-1] == 1:
    return image
  gray = image @ jnp.asarray([0.299, 0.587, 0.114], image.dtype)
  return jnp.broadcast_to(gray[..., None], image.shape)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _identity(image, magnitude):
  del magnitude
  return image


def _autocontrast(image, magnitude):
  del magnitude
  lo = image.min(axis=(0, 1), keepdims=True)
  hi = image.max(axis=(0, 1), keepdims=True)
  scaled = (image - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.where(hi > lo, scaled, image)


def _equalize_channel(channel: jax.Array) -> jax.Array:
  """PIL's ImageOps.equalize on one channel given as floats in [0, 1]."""
  levels = jnp.round(channel * 255.0).astype(jnp.int32)
  hist = jnp.bincount(levels.ravel(), length=256)
  last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))]
  step = (hist.sum() - last) // 255
  lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
  lut = jnp.clip(lut, 0, 255)
  return jnp.where(step > 0, lut[levels].astype(channel.dtype) / 255.0, channel)


def _equalize(image, magnitude):
  del magnitude
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


def _brightness(image, magnitude):
  return _blend(jnp.zeros_like(image), image, magnitude)


def _color(image, magnitude):
  return _blend(_grayscale(image), image, magnitude)


def _contrast(image, magnitude):
  return _blend(jnp.full_like(image, _grayscale(image).mean()), image, magnitude)


def _sharpness(image, magnitude):
  h, w, _ = image.shape
  kernel = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  blurred = sum(
    kernel[dy][dx] * padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)
  )
  blurred = blurred / 13.0
  # PIL keeps the one-pixel border unsmoothed.
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return _blend(jnp.where(interior, blurred, image), image, magnitude)


def _posterize(image, magnitude):
  bits = jnp.round(magnitude).astype(jnp.int32)
  mask = jnp.left_shift(jnp.int32(0xFF), 8 - bits) & 0xFF
  levels = jnp.floor(image * 255.0 + 0.5).astype(jnp.int32)
  return (levels & mask).astype(image.dtype) / 255.0


def _solarize(image, magnitude):
  return pix.solarize(image, magnitude)


def warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
  """Bilinear pull-resampling `out[o] = in[matrix @ (o_y, o_x, 1)]`, gray outside.

  A 2-D gather of four neighbours; `dm_pix.affine_transform` would interpolate over
  the channel axis as a third spatial axis and is ~100x slower on CPU. Integer
  source coordinates (e.g. the identity) reproduce the input exactly.

  Args:
    image: [H, W, C].
    matrix: [2, 3] map from output (y, x, 1) to input (y, x).

  Returns:
    [H, W, C].
  """
  h, w, c = image.shape
  ys, xs = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
  )
  y, x = matrix @ jnp.stack([ys.ravel(), xs.ravel(), jnp.ones(h * w)])
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = y - y0, x - x0
  flat = image.reshape(h * w, c)
  out = jnp.zeros((h * w, c), image.dtype)
  for dy, dx, weight in (
    (0, 0, (1 - wy) * (1 - wx)),
    (0, 1, (1 - wy) * wx),
    (1, 0, wy * (1 - wx)),
    (1, 1, wy * wx),
  ):
    yy, xx = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
    valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    values = flat[jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)]
    out = out + weight[:, None] * jnp.where(valid[:, None], values, GRAY)
  return out.reshape(h, w, c)


def _about_centre(image: jax.Array, linear: jax.Array, shift: jax.Array) -> jax.Array:
  """[2, 3] matrix applying `linear` about the image centre, then shifting by `shift`."""
  h, w, _ = image.shape
  centre = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0])
  return jnp.concatenate([linear, (centre - linear @ centre + shift)[:, None]], axis=1)


def _rotate(image, magnitude):
  angle = jnp.deg2rad(magnitude)
  c, s = jnp.cos(angle), jnp.sin(angle)
  return _about_centre(image, jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])]), jnp.zeros(2))


def _shear_x(image, magnitude):
  return _about_centre(
    image, jnp.asarray([[1.0, 0.0], [0.0, 1.0]]).at[1, 0].set(magnitude), jnp.zeros(2)
  )


def _shear_y(image, magnitude):
  return _about_centre(
    image, jnp.asarray([[1.0, 0.0], [0.0, 1.0]]).at[0, 1].set(magnitude), jnp.zeros(2)
  )


def _translate_x(image, magnitude):
  return _about_centre(image, jnp.eye(2), jnp.stack([0.0, magnitude * image.shape[1]]))


def _translate_y(image, magnitude):
  return _about_centre(image, jnp.eye(2), jnp.stack([magnitude * image.shape[0], 0.0]))


# (name, function, low, high): magnitude ~ U[low, high] (Posterize rounds to bits).
# Pixel ops map (image, magnitude) -> image; geometric ops (`_GEOMETRIC`) map
# (image, magnitude) -> a [2, 3] pull matrix for `warp`.
OPS = (
  ("Identity", _identity, 0.0, 0.0),
  ("AutoContrast", _autocontrast, 0.0, 0.0),
  ("Equalize", _equalize, 0.0, 0.0),
  ("Brightness", _brightness, 0.05, 0.95),
  ("Color", _color, 0.05, 0.95),
  ("Contrast", _contrast, 0.05, 0.95),
  ("Sharpness", _sharpness, 0.05, 0.95),
  ("Posterize", _posterize, 4.0, 8.0),
  ("Solarize", _solarize, 0.0, 1.0),
  ("Rotate", _rotate, -30.0, 30.0),
  ("ShearX", _shear_x, -0.3, 0.3),
  ("ShearY", _shear_y, -0.3, 0.3),
  ("TranslateX", _translate_x, -0.3, 0.3),
  ("TranslateY", _translate_y, -0.3, 0.3),
)
OP_NAMES = tuple(name for name, *_ in OPS)


_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def apply_op(image: jax.Array, op_index: jax.Array, level: jax.Array) -> jax.Array:
  """Applies op `OPS[op_index]` at relative level in [0, 1] of its magnitude range.

  Under `vmap` a `switch` evaluates every branch, so the geometric ops only build a
  [2, 3] matrix inside the switch and a single `warp` follows; the pixel ops are
  cheap elementwise functions.
  """

  def pixel_branch(f, lo, hi, geometric):
    if geometric:
      return lambda img, lv: img
    return lambda img, lv: f(img, lo + lv * (hi - lo)).astype(img.dtype)

  def matrix_branch(f, lo, hi, geometric):
    if geometric:
      return lambda img, lv: f(img, lo + lv * (hi - lo)).astype(jnp.float32)
    return lambda img, lv: _about_centre(img, jnp.eye(2), jnp.zeros(2))

  geometric = [name in _GEOMETRIC for name, *_ in OPS]
  image = jax.lax.switch(
    op_index,
    [pixel_branch(f, lo, hi, g) for (_, f, lo, hi), g in zip(OPS, geometric)],
    image,
    level,
  )
  matrix = jax.lax.switch(
    op_index,
    [matrix_branch(f, lo, hi, g) for (_, f, lo, hi), g in zip(OPS, geometric)],
    image,
    level,
  )
  return jnp.clip(warp(image, matrix), 0.0, 1.0)


def cutout(image: jax.Array, key: jax.Array, *, frac: float = 0.5) -> jax.Array:
  """Fills a `round(frac * H)`-sided square at a uniform random centre with gray 0.5."""
  h, w, _ = image.shape
  size = max(1, round(frac * h))
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  y0, x0 = cy - size // 2, cx - size // 2
  ys, xs = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
  return jnp.where(inside, jnp.asarray(GRAY, image.dtype), image)


def strong(
  image: jax.Array,
  key: jax.Array,
  *,
  pad: int = 4,
  cutout_frac: float = 0.5,
  crop: str = "pad_crop",
) -> jax.Array:
  """FixMatch strong augmentation (see the module docstring). [H, W, C] -> [H, W, C].

  Its first stage is the weak view of `crop` ('pad_crop' or 'random_resized_crop').
  """
  k_weak, k_num, k_ops, k_levels, k_cut = jax.random.split(key, 5)
  image = weak(image, k_weak, pad=pad, crop=crop)
  max_ops = max(NUM_OPS_CHOICES)
  num_ops = jax.random.choice(k_num, jnp.asarray(NUM_OPS_CHOICES))
  op_indices = jax.random.randint(k_ops, (max_ops,), 0, len(OPS))
  levels = jax.random.uniform(k_levels, (max_ops,))
  for i in range(max_ops):
    # An op beyond the drawn count is the identity (index 0).
    image = apply_op(image, jnp.where(i < num_ops, op_indices[i], 0), levels[i])
  return cutout(image, k_cut, frac=cutout_frac)


def weak_batch(
  images: jax.Array, keys: jax.Array, *, pad: int = 4, crop: str = "pad_crop"
) -> jax.Array:
  """`weak` over a batch: images [B, H, W, C], keys [B, 2] -> [B, H, W, C]."""
  return jax.vmap(lambda x, k: weak(x, k, pad=pad, crop=crop))(images, keys)


def strong_batch(
  images: jax.Array,
  keys: jax.Array,
  *,
  pad: int = 4,
  cutout_frac: float = 0.5,
  crop: str = "pad_crop",
) -> jax.Array:
  """`strong` over a batch: images [B, H, W, C], keys [B, 2] -> [B, H, W, C]."""
  return jax.vmap(lambda x, k: strong(x, k, pad=pad, cutout_frac=cutout_frac, crop=crop))(
    images, keys
  )


def make_preprocess(
  kind: str, *, mean, std, pad: int = 4, crop: str = "pad_crop"
) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
  """Per-device preprocessing `(uint8 images [B, H, W, C], keys [B]) -> float32 normalised`.

  Args:
    kind: 'none' (evaluation; keys may be None), 'weak' (flip + crop) or 'strong'
      (weak, then RandAugment + Cutout).
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation.
    pad: padding of the 'pad_crop' random crop.
    crop: the weak view's crop, one of `CROPS`: 'pad_crop' or 'random_resized_crop'.
  """
  if kind not in ("none", "weak", "strong"):
    raise ValueError(f"Unknown preprocessing {kind!r}; expected 'none', 'weak' or 'strong'.")
  if crop not in CROPS:
    raise ValueError(f"Unknown crop {crop!r}; expected one of {CROPS}.")
  mean = tuple(float(m) for m in np.atleast_1d(mean))
  std = tuple(float(s) for s in np.atleast_1d(std))

  def preprocess(images, keys):
    x = to_float(images)
    if kind == "weak":
      x = jax.vmap(functools.partial(weak, pad=pad, crop=crop))(x, keys)
    elif kind == "strong":
      x = jax.vmap(functools.partial(strong, pad=pad, crop=crop))(x, keys)
    return normalize(x, jnp.asarray(mean), jnp.asarray(std))

  return preprocess

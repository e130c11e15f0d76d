"""Partial least squares between a CNN's learned features and its target: FIGAN's dimension reduction.

FIGAN (Hasenstab et al., IEEE Access 2023) does not condition its GAN on all of a CNN's features: it first
reduces them with PLS against the CNN's own target, so that each condition is a direction of feature space that
is predictive of the target, ranked by how much target variance it explains ("feature 3 explains 1.6 %").
Design choices:

* **Standardised spaces.** Features are z-scored per column (a zero-variance column is kept with scale 1, so it
  simply contributes nothing); targets too. Regression targets are ``(N,)`` or ``(N, T)``; classification targets
  are class indices, one-hot encoded and then z-scored, so every class counts equally whatever its size.
  scikit-learn's ``PLSRegression(scale=False)`` (NIPALS, regression deflation) is run on the standardised data.
* **% target variance per component.** Component j's rank-1 reconstruction of the standardised targets is
  ``t_j q_jᵀ`` (x-scores times y-loadings). Its share is ``‖t_j q_jᵀ‖² / ‖Y‖²`` (sums over samples and target
  columns). PLS x-scores are mutually orthogonal, so these shares add up to the R² of the k-component fit
  and never exceed 1.
* **Default number of components**: the smallest k whose cumulative share reaches ``variance_threshold``,
  bounded to ``[min_components, max_components]`` and to what the data allow (``min(N-1, F)`` and the number of
  components NIPALS could extract before the target residual vanished). Components are sequential, so the first
  k of a longer fit are exactly the k-component fit; no refit is needed.
* **Scores are the GAN's conditions**, so they are returned zero-mean and unit-variance per component; the mean
  and SD used are stored and :meth:`PLSState.transform` reproduces the fit's scores exactly (the fit's scores are
  computed through ``transform`` itself).
* **Plain state.** :class:`PLSState` holds only numpy arrays and plain values, no fitted sklearn object.
  :func:`save_pls` writes ``pls.npz`` (arrays, loaded with ``allow_pickle=False``) plus ``pls.json`` (plain
  values and a ``format_version``), so a saved state is portable across library versions and safe to load.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd

from .layout import PLS_ARRAYS, PLS_META
from .files import write_atomic, write_text_atomic
from .sizes import check_npz_fits, check_sizes, read_json

Task = Literal["regression", "classification"]
FORMAT_VERSION = 1
_ARRAYS = ("x_mean", "x_scale", "x_weights", "x_loadings", "x_rotations", "y_loadings", "y_mean", "y_scale",
           "score_mean", "score_sd", "explained_target_variance")
_PLAIN = ("task", "class_names", "n_components", "n_features", "n_targets", "target_ndim", "n_samples")

__all__ = ["PLSError", "PLSState", "fit_pls", "save_pls", "load_pls", "plot_variance", "images_to_scores"]


class PLSError(ValueError):
    """The PLS inputs or a saved PLS state are not usable; the message says what and where."""


# --------------------------------------------------------------------------------------------- state

@dataclass(eq=False)
class PLSState:
    """A fitted PLS reduction (arrays in float64, the standardised feature/target spaces).

    Shapes: F features, T standardised target columns (T = number of classes for classification), k components.
    """
    x_mean: np.ndarray                     # (F,)
    x_scale: np.ndarray                    # (F,)  feature SD, 1 for zero-variance columns
    x_weights: np.ndarray                  # (F, k)
    x_loadings: np.ndarray                 # (F, k)
    x_rotations: np.ndarray                # (F, k) raw scores = standardised X @ x_rotations
    y_loadings: np.ndarray                 # (T, k)
    y_mean: np.ndarray                     # (T,)
    y_scale: np.ndarray                    # (T,)
    score_mean: np.ndarray                 # (k,) of the raw scores on the fit data
    score_sd: np.ndarray                   # (k,)
    explained_target_variance: np.ndarray  # (k,) fraction of standardised-target variance per component
    task: Task
    class_names: list[str] | None
    n_components: int
    n_features: int
    n_targets: int
    target_ndim: int = 1                   # 1: targets were (N,), predict returns (N,); 2: (N, T)
    n_samples: int = 0                     # fit sample count (information only)

    # -- projections ------------------------------------------------------------------------------
    def _check_features(self, features: Any) -> np.ndarray:
        x = _as_2d_features(features)
        if x.shape[1] != self.n_features:
            raise PLSError(f"features have {x.shape[1]} columns but this PLS state was fit on {self.n_features}; "
                           f"use the same CNN layer as for the fit")
        _check_finite(x, "features")
        return x

    def raw_scores(self, features: Any) -> np.ndarray:
        """PLS x-scores before the per-component standardisation, float64 (N, k)."""
        x = self._check_features(features)
        return ((x - self.x_mean) / self.x_scale) @ self.x_rotations

    def transform(self, features: Any) -> np.ndarray:
        """Standardised PLS scores (zero mean, unit SD on the fit data), float64 (N, k): the GAN conditions."""
        return (self.raw_scores(features) - self.score_mean) / self.score_sd

    def inverse_scores(self, scores: Any) -> np.ndarray:
        """Standardised scores back to raw PLS scores (e.g. to walk a condition through feature space)."""
        s = np.asarray(scores, dtype=np.float64)
        return s * self.score_sd + self.score_mean

    def decision_function(self, features: Any) -> np.ndarray:
        """The k-component PLS prediction of the targets in target units, float64 (N, T).

        Classification: one value per class (the reconstructed one-hot code, roughly a class membership).
        """
        ys = self.raw_scores(features) @ self.y_loadings.T
        return ys * self.y_scale + self.y_mean

    def predict(self, features: Any) -> np.ndarray:
        """Target prediction: regression values ((N,) or (N, T) like the fit targets); class indices (N,)."""
        y = self.decision_function(features)
        if self.task == "classification":
            return np.argmax(y, axis=1)
        return y[:, 0] if self.target_ndim == 1 else y

    # -- reporting --------------------------------------------------------------------------------
    def variance_table(self) -> pd.DataFrame:
        """One row per component: component (1-based), pct_target_variance, cumulative_pct."""
        pct = 100.0 * np.asarray(self.explained_target_variance, dtype=np.float64)
        return pd.DataFrame({"component": np.arange(1, self.n_components + 1), "pct_target_variance": pct,
                             "cumulative_pct": np.cumsum(pct)})

    # -- comparison -------------------------------------------------------------------------------
    def equals(self, other: object) -> bool:
        """Same plain values and bit-identical arrays."""
        if not isinstance(other, PLSState):
            return False
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in _ARRAYS:
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


# --------------------------------------------------------------------------------------------- validation

def _as_2d_features(features: Any) -> np.ndarray:
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PLSError(f"features must be a numeric array (N, F): {e}") from None
    if x.ndim != 2:
        raise PLSError(f"features must be a 2-D array (N, F), got shape {x.shape}")
    return x


def _rows_list(bad: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in bad[:10])
    return f"{len(bad)} row(s): {shown}{', ...' if len(bad) > 10 else ''}"


def _check_finite(a: np.ndarray, what: str) -> None:
    bad_mask = ~np.isfinite(a)
    if bad_mask.any():
        rows = np.flatnonzero(bad_mask.reshape(len(a), -1).any(axis=1))
        raise PLSError(f"{what} contain NaN/inf in {_rows_list(rows)}")


def _standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = a.mean(axis=0)
    sd = a.std(axis=0)
    # zero (or numerically zero) variance: keep the column, scale 1 (it stays ~0 after centring)
    tiny = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale = np.where(tiny, 1.0, sd)
    return (a - mean) / scale, mean, scale


def _encode_targets(targets: Any, task: str, n: int, class_names: Sequence[str] | None
                    ) -> tuple[np.ndarray, list[str] | None, int]:
    """-> (Y float64 (N, T), class names or None, target ndim)."""
    if task == "regression":
        try:
            y = np.asarray(targets, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise PLSError(f"regression targets must be numeric: {e}") from None
        if y.ndim not in (1, 2):
            raise PLSError(f"regression targets must be (N,) or (N, T), got shape {y.shape}")
        ndim = y.ndim
        y = y.reshape(len(y), -1) if y.ndim == 2 else y[:, None]
        if len(y) != n:
            raise PLSError(f"features have {n} rows but targets have {len(y)}; they must match row for row")
        _check_finite(y, "targets")
        if y.shape[1] == 0:
            raise PLSError("targets have no columns")
        const = [j for j in range(y.shape[1]) if np.ptp(y[:, j]) == 0]
        if const:
            raise PLSError(f"regression target column(s) {const} are constant (value {y[0, const[0]]:g}); "
                           f"there is no target variance to explain")
        return y, None, ndim
    if task != "classification":
        raise PLSError(f"task must be 'regression' or 'classification', got {task!r}")

    raw = np.asarray(targets)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise PLSError(f"classification targets must be class indices (N,), got shape {raw.shape}")
    if len(raw) != n:
        raise PLSError(f"features have {n} rows but targets have {len(raw)}; they must match row for row")
    names = [str(c) for c in class_names] if class_names is not None else None
    if raw.dtype.kind in "OUS":  # labels given by name
        if names is None:
            raise PLSError("classification targets are strings; pass class_names to map them to indices")
        lut = {c: i for i, c in enumerate(names)}
        unknown = sorted({str(v) for v in raw} - set(lut))
        if unknown:
            raise PLSError(f"class label(s) {unknown[:5]} are not in class_names {names}")
        idx = np.array([lut[str(v)] for v in raw], dtype=np.int64)
    else:
        try:
            f = raw.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise PLSError(f"classification targets must be integer class indices: {e}") from None
        _check_finite(f, "targets")
        bad = np.flatnonzero(f != np.round(f))
        if len(bad):
            raise PLSError(f"classification targets must be integer class indices; non-integer values in "
                           f"{_rows_list(bad)}")
        idx = f.astype(np.int64)
        n_cls = len(names) if names is not None else int(idx.max()) + 1
        out = np.flatnonzero((idx < 0) | (idx >= n_cls))
        if len(out):
            raise PLSError(f"class index out of range 0..{n_cls - 1} in {_rows_list(out)}")
    n_cls = len(names) if names is not None else int(idx.max()) + 1
    present = np.unique(idx)
    if len(present) < 2:
        label = names[present[0]] if names else str(present[0])
        raise PLSError(f"classification targets hold a single class ({label!r}); at least two are needed")
    names = names if names is not None else [str(i) for i in range(n_cls)]
    onehot = np.zeros((n, n_cls), dtype=np.float64)
    onehot[np.arange(n), idx] = 1.0
    return onehot, names, 1


# --------------------------------------------------------------------------------------------- fit

def fit_pls(features: Any, targets: Any, task: Task, n_components: int | None = None, max_components: int = 8,
            min_components: int = 2, variance_threshold: float = 0.9,
            class_names: Sequence[str] | None = None) -> tuple[PLSState, np.ndarray]:
    """Fit PLS of the CNN features (N, F) against the CNN's targets; return the state and the standardised
    scores (N, k) of the fit data (the GAN's conditions).

    ``n_components=None`` picks k automatically (see the module docstring); an explicit value must lie in
    ``1..min(N-1, F)`` (``max_components``/``min_components`` bound only the automatic choice).
    """
    from sklearn.cross_decomposition import PLSRegression  # local: keeps `import models.pls` light

    x = _as_2d_features(features)
    n, n_feat = x.shape
    if n < 3:
        raise PLSError(f"PLS needs at least 3 samples, got {n}")
    if n_feat < 1:
        raise PLSError("features have no columns")
    y, names, target_ndim = _encode_targets(targets, task, n, class_names)
    _check_finite(x, "features")

    allowed = min(n - 1, n_feat)
    if n_components is not None:
        if isinstance(n_components, bool) or int(n_components) != n_components:
            raise PLSError(f"n_components must be an integer, got {n_components!r}")
        n_components = int(n_components)
        if n_components < 1 or n_components > allowed:
            raise PLSError(f"n_components must be between 1 and {allowed} (min(N-1, F) with N={n}, "
                           f"F={n_feat}), got {n_components}")
        k_fit = n_components
    else:
        if min_components < 1 or max_components < 1 or min_components > max_components:
            raise PLSError(f"need 1 <= min_components <= max_components, got {min_components}, {max_components}")
        if not 0.0 < variance_threshold <= 1.0:
            raise PLSError(f"variance_threshold must be in (0, 1], got {variance_threshold}")
        k_fit = min(max_components, allowed)

    xs, x_mean, x_scale = _standardise(x)
    ys, y_mean, y_scale = _standardise(y)

    pls = PLSRegression(n_components=k_fit, scale=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pls.fit(xs, ys)
    # NIPALS stops early (trailing zero columns) when the target residual vanishes
    norms = np.linalg.norm(pls.x_weights_, axis=0)
    extracted = int(np.argmin(norms > 0)) if not np.all(norms > 0) else k_fit
    if extracted == 0:
        raise PLSError("PLS found no component: the features carry no information about the targets")
    if n_components is not None and extracted < n_components:
        raise PLSError(f"only {extracted} PLS component(s) could be extracted (the target is fully explained "
                       f"by then); ask for n_components <= {extracted}")
    for w in caught:
        if "y residual is constant" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # share of standardised-target variance per component, over all extracted components
    w_all = pls.x_weights_[:, :extracted]
    p_all = pls.x_loadings_[:, :extracted]
    q_all = pls.y_loadings_[:, :extracted]
    r_all = w_all @ np.linalg.pinv(p_all.T @ w_all)
    t_all = xs @ r_all
    total = float(np.sum(ys ** 2))
    share = (np.sum(t_all ** 2, axis=0) * np.sum(q_all ** 2, axis=0)) / total

    if n_components is not None:
        k = n_components
    else:
        hi = extracted
        lo = min(min_components, hi)
        reach = np.flatnonzero(np.cumsum(share) >= variance_threshold - 1e-12)
        k = int(reach[0]) + 1 if len(reach) else hi
        k = max(lo, min(k, hi))

    w, p, q = w_all[:, :k].copy(), p_all[:, :k].copy(), q_all[:, :k].copy()
    rot = w @ np.linalg.pinv(p.T @ w)  # (P'W is upper triangular: equals the first k columns of r_all)
    raw = xs @ rot
    s_mean = raw.mean(axis=0)
    s_sd = raw.std(axis=0)
    if np.any(s_sd <= 1e-12):
        j = int(np.flatnonzero(s_sd <= 1e-12)[0]) + 1
        raise PLSError(f"PLS component {j} has zero variance on the fit data; ask for fewer components")
    state = PLSState(x_mean=x_mean, x_scale=x_scale, x_weights=w, x_loadings=p, x_rotations=rot, y_loadings=q,
                     y_mean=y_mean, y_scale=y_scale, score_mean=s_mean, score_sd=s_sd,
                     explained_target_variance=share[:k].copy(), task=task, class_names=names, n_components=k,
                     n_features=n_feat, n_targets=y.shape[1], target_ndim=target_ndim, n_samples=n)
    return state, state.transform(x)


# --------------------------------------------------------------------------------------------- persistence

def save_pls(state: PLSState, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``pls.npz`` + ``pls.json`` into ``directory``; return the directory.

    Saving the same state again is a no-op; a *different* existing state is only replaced with
    ``overwrite=True``.
    """
    d = Path(directory)
    npz, js = d / PLS_ARRAYS, d / PLS_META
    if npz.exists() or js.exists():
        try:
            same = load_pls(d).equals(state)
        except PLSError:
            same = False
        if same:
            return d
        if not overwrite:
            raise PLSError(f"{d} already holds a different PLS state; pass overwrite=True to replace it")
    d.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(getattr(state, name), dtype=np.float64) for name in _ARRAYS}
    plain = {"format_version": FORMAT_VERSION, **{name: getattr(state, name) for name in _PLAIN}}
    plain["n_components"], plain["n_features"] = int(state.n_components), int(state.n_features)
    plain["n_targets"], plain["target_ndim"], plain["n_samples"] = (int(state.n_targets), int(state.target_ndim),
                                                                   int(state.n_samples))
    write_atomic(npz, lambda fh: np.savez(fh, **arrays))
    write_text_atomic(js, json.dumps(plain, indent=2))
    return d


def load_pls(directory: str | Path) -> PLSState:
    """Read a state written by :func:`save_pls` (no pickle is ever loaded). The sizes in pls.json are bounded
    (:mod:`models.sizes`) and the npz may not unpack to more than the arrays they describe, both checked before
    any array is read."""
    d = Path(directory)
    npz, js = d / PLS_ARRAYS, d / PLS_META
    for f in (npz, js):
        if not f.is_file():
            raise PLSError(f"{d}: no {f.name} (not a saved PLS state)")
    try:
        plain = read_json(js)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PLSError(f"{js}: not valid JSON: {e}") from None
    if not isinstance(plain, dict) or plain.get("format_version") != FORMAT_VERSION:
        got = plain.get("format_version") if isinstance(plain, dict) else None
        raise PLSError(f"{js}: format_version {got!r} is not supported (expected {FORMAT_VERSION})")
    missing = [k for k in _PLAIN if k not in plain]
    if missing:
        raise PLSError(f"{js}: missing key(s) {missing}")
    check_sizes(plain, js.name)
    f, k, t = plain["n_features"], plain["n_components"], plain["n_targets"]
    check_npz_fits(npz, 8 * (f * (2 + 3 * k) + t * (k + 2) + 3 * k))       # the float64 arrays of f, k and t
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PLSError(f"{npz}: unreadable: {e}") from None
    missing = [k for k in _ARRAYS if k not in arrays]
    if missing:
        raise PLSError(f"{npz}: missing array(s) {missing}")
    state = PLSState(**{k: arrays[k] for k in _ARRAYS}, **{k: plain[k] for k in _PLAIN})
    f, k, t = state.n_features, state.n_components, state.n_targets
    expect = {"x_mean": (f,), "x_scale": (f,), "x_weights": (f, k), "x_loadings": (f, k), "x_rotations": (f, k),
              "y_loadings": (t, k), "y_mean": (t,), "y_scale": (t,), "score_mean": (k,), "score_sd": (k,),
              "explained_target_variance": (k,)}
    wrong = [f"{name} {arrays[name].shape} != {shape}" for name, shape in expect.items()
             if arrays[name].shape != shape]
    if wrong:
        raise PLSError(f"{npz}: inconsistent shapes: {'; '.join(wrong)}")
    return state


# --------------------------------------------------------------------------------------------- plot

def plot_variance(state: PLSState, path: str | Path, title: str = "Target variance explained per PLS component"
                  ) -> Path:
    """Bar chart PNG of the % target variance per component, cumulative % as a line; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch
    from matplotlib.figure import Figure

    table = state.variance_table()
    comp, pct, cum = table["component"].to_numpy(), table["pct_target_variance"].to_numpy(), \
        table["cumulative_pct"].to_numpy()
    fig = Figure(figsize=(max(4.5, 0.7 * len(comp) + 2.5), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(comp, pct, color="#4C72B0", label="per component")
    for b, v in zip(bars, pct):
        ax.annotate(f"{v:.1f}%" if v >= 0.1 else f"{v:.2g}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.plot(comp, cum, color="#DD8452", marker="o", label="cumulative")
    ax.set_xticks(comp)
    ax.set_xlabel("PLS component")
    ax.set_ylabel("% of target variance explained")
    ax.set_ylim(0, max(100.0, float(cum.max(initial=0)) * 1.08))
    ax.set_title(title)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------- images

def images_to_scores(model: Any, images: Any, state: PLSState, layer: str | None = None,
                     transform: Callable[[Any], Any] | None = None, batch_size: int = 256,
                     device: Any = "cpu", progress: bool | str = False) -> np.ndarray:
    """Images -> CNN features (:func:`models.features.extract_features`) -> standardised PLS scores (N, k).

    ``layer`` and ``transform`` must be the ones the state's features were extracted with.
    """
    from models.features import extract_features

    feats = extract_features(model, images, layer=layer, batch_size=batch_size, device=device,
                             progress=progress, transform=transform)
    if feats.shape[1] != state.n_features:
        where = f"layer {layer!r}" if layer else "the final Linear layer's input"
        raise PLSError(f"{where} gives {feats.shape[1]} features but the PLS state was fit on "
                       f"{state.n_features}; use the layer the PLS was fit on")
    return state.transform(feats)

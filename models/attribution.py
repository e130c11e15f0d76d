"""Attribution maps beside the sweeps: *where* the CNN looks, next to FIGAN's *what* (Hasenstab et al. 2023 set
their sequences beside vanilla-gradient and Grad-CAM maps of the same CNN).

For each PLS component, the real images with the lowest and the highest scores on it (``n`` of each) and the
sweep's frames (first seed) are attributed with Captum:

* **vanilla gradient** (``captum.attr.Saliency``): |∂ output / ∂ pixel|, pixel-sharp but noisy;
* **Grad-CAM** (``captum.attr.LayerGradCam``) on the CNN's last ``nn.Conv2d``: gradient-weighted activations of
  that layer, ReLU'd and upsampled to the image; coarse (the layer's resolution) but class-discriminative.

The output attributed is the CNN's output in the target's direction: its single output (regression, one logit),
the positive class of two logits, or each image's predicted class otherwise. Per component the figure shows the
mean map of each end and their difference (high − low), and the sweep's frames under their Grad-CAM maps.

What they can and cannot tell (the caption says it too): a map says which pixels the output is locally
sensitive to, not what about them matters, and not whether the CNN is right; the sweep says what changes the
scores. An exported (pt2) CNN has no modules to hook: it gets the vanilla gradient only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .features import FeatureError
from .sequences import _new_figure, _save

CAPTION = ("Where the CNN looks: mean attribution of the real images at each end of the component's scores, and "
           "their difference. Vanilla gradient = |∂ output / ∂ pixel| (sharp, noisy); Grad-CAM = gradient-weighted "
           "activations of the last convolution (coarse). A map shows which pixels the output is sensitive to, not "
           "what about them matters (that is the sweep) nor whether the CNN is right.")


def last_conv(model: nn.Module) -> str | None:
    """Qualified name of the last ``nn.Conv2d`` in ``named_modules()`` order (None when there is none)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else None


def output_target(out: torch.Tensor) -> torch.Tensor | int:
    """Which output to attribute: the only one, the positive class of two, else each image's largest."""
    if out.ndim == 1 or out.shape[1] == 1:
        return 0
    if out.shape[1] == 2:
        return 1
    return out.argmax(1)


def attribute(model: nn.Module, x: torch.Tensor, conv: str | None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{"gradient": (N, H, W), "gradcam": (N, H, W) when ``conv``} for images x (N, C, H, W) in the CNN's input
    space. Gradient maps are the channel-max of |∂y/∂x|; Grad-CAM maps are upsampled bilinearly."""
    from captum.attr import LayerAttribution, LayerGradCam, Saliency

    was_training = model.training
    model.eval()
    forward = (lambda t: model(t).reshape(len(t), -1))
    maps: dict[str, list[np.ndarray]] = {"gradient": [], "gradcam": []}
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].float().clone().requires_grad_(True)
            try:
                with torch.no_grad():
                    target = output_target(forward(xb))
            except Exception as e:  # noqa: BLE001 - the network's own message is kept in ours
                raise FeatureError(f"the CNN rejected input of shape {tuple(xb.shape)}: {e}") from e
            grad = Saliency(forward).attribute(xb, target=target, abs=True)
            maps["gradient"].append(grad.amax(1).detach().numpy())
            if conv is not None:
                layer = dict(model.named_modules())[conv]
                cam = LayerGradCam(forward, layer).attribute(xb, target=target, relu_attributions=True)
                cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
                maps["gradcam"].append(cam[:, 0].detach().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in maps.items() if v}


def end_indices(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``n`` lowest and the ``n`` highest scores (disjoint when there are fewer than 2n rows)."""
    order = np.argsort(scores, kind="stable")
    n = max(1, min(n, len(order) // 2))
    return order[:n], order[-n:]


def component_maps(model: nn.Module, images: torch.Tensor, scores: np.ndarray, frames: torch.Tensor,
                   n: int) -> dict:
    """Mean maps of the low and high ends of one component's scores, their difference, and the frames' maps."""
    conv = None if getattr(model, "exported", False) else last_conv(model)
    lo, hi = end_indices(scores, n)
    ends = {"low": attribute(model, images[lo], conv), "high": attribute(model, images[hi], conv)}
    kinds = list(ends["low"])
    out = {"layer": conv, "kinds": kinds, "n": len(lo),
           "mean_image": {e: images[idx].float().mean(0).mean(0).numpy() for e, idx in (("low", lo), ("high", hi))},
           "mean": {e: {k: ends[e][k].mean(0) for k in kinds} for e in ends},
           "frames": attribute(model, frames, conv)}
    out["difference"] = {k: out["mean"]["high"][k] - out["mean"]["low"][k] for k in kinds}
    return out


def save_attribution_png(maps: dict, frames: np.ndarray, values: np.ndarray, component: int, path: Path,
                         max_frames: int = 5) -> Path:
    """Rows: one per map kind (low end, high end, high − low) + the sweep's frames under Grad-CAM (or the
    gradient). Images are shown in grey under the maps."""
    kinds = maps["kinds"]
    picks = np.unique(np.round(np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))).astype(int))
    cols = max(3, len(picks))
    fig = _new_figure(1.7 * cols + 0.4, 1.8 * (len(kinds) + 1) + 0.6)
    axes = fig.subplots(len(kinds) + 1, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, kind in enumerate(kinds):
        for c, end in enumerate(("low", "high")):
            ax = axes[r, c]
            ax.imshow(maps["mean_image"][end], cmap="gray")
            ax.imshow(maps["mean"][end][kind], cmap="inferno", alpha=0.6)
            ax.set_title(f"{kind}: {end} c_{component + 1} (n={maps['n']})", fontsize=7)
        diff = maps["difference"][kind]
        lim = float(np.abs(diff).max()) or 1.0
        axes[r, 2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[r, 2].set_title(f"{kind}: high − low", fontsize=7)
    shown = "gradcam" if "gradcam" in maps["frames"] else "gradient"
    for c, f in enumerate(picks):
        ax = axes[len(kinds), c]
        ax.imshow(frames[f].mean(0), cmap="gray", vmin=0, vmax=1)
        ax.imshow(maps["frames"][shown][f], cmap="inferno", alpha=0.5)
        ax.set_title(f"sweep c_{component + 1} = {values[f]:+.1f} SD", fontsize=7)
    layer = f"; Grad-CAM layer {maps['layer']}" if maps["layer"] else "; no Grad-CAM (no convolution to hook)"
    fig.suptitle(f"Component {component + 1}: attribution maps{layer}", fontsize=8)
    return _save(fig, path)

"""Read a CNN's learned features (and its own output) for a set of images.

FIGAN explains a CNN through the representation it has learned, so the first step is to run the trained network
over the images and keep, per image, one feature vector. Design choices:

* **Default layer = the input of the final ``nn.Linear``.** That vector is what the CNN's decision is a linear
  function of (the penultimate representation), so it is the natural "learned feature" space and it exists in
  almost every image CNN. It is found generically as the last ``nn.Linear`` registered in ``named_modules()``
  order and read with a forward *pre*-hook (the module's input), so no architecture-specific code is needed.
* **Any other layer by name** (``layer="features.3"``): its *output* is read with a forward hook. Convolutional
  outputs ``(N, C, H, W)`` are global-average pooled to ``(N, C)`` (one value per channel, independent of the
  image size); other ranks are flattened.
* **Streaming.** ``images`` is either one array/tensor ``(N, C, H, W)`` in [0, 1] (cut into ``batch_size``
  batches here) or any iterable of batches, including ``ImageDataset.iter_batches`` which yields
  ``(indices, images)``; only one batch of pixels is ever in memory, the result is a small ``(N, F)`` array.
* **No side effects on the model.** It runs in eval mode under ``torch.no_grad()``; its previous training flag
  and device are restored afterwards and every hook is removed in a ``finally`` block, even when it fails.
* **Clear errors.** Anything the network raises on an input (wrong channel count, wrong size) becomes a
  :class:`FeatureError` naming the input shape and the original message.

``extract_features`` and ``model_output`` share one batching helper (:func:`_collect`); they differ only in
what they read from each forward pass.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

Images = np.ndarray | Tensor | Iterable[Any]
Transform = Callable[[Tensor], Tensor]

__all__ = ["FeatureError", "find_final_linear", "extract_features", "model_output"]


class FeatureError(ValueError):
    """Features cannot be read from this model/input; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------- layers

def find_final_linear(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` registered in ``model.named_modules()`` order."""
    last: str | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise FeatureError(f"model {type(model).__name__} has no nn.Linear layer; name a layer with layer=...")
    return last


def _resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
    others = [n for n in names if n not in close][: max(0, 8 - len(close))]
    shown = close + others
    more = f" (and {len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    hint = f"close matches: {close}; " if close else ""
    raise FeatureError(f"model {type(model).__name__} has no layer named {layer!r}; {hint}"
                       f"valid names include {shown}{more}")


def _first_tensor(x: Any) -> Tensor:
    """The tensor of a module's input/output (the first one when it is a tuple/list)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            if isinstance(item, Tensor):
                return item
    raise FeatureError(f"the hooked layer produced {type(x).__name__}, not a tensor; choose another layer")


def _to_rows(t: Tensor) -> Tensor:
    """(N, C, H, W) -> global average pool (N, C); (N,) -> (N, 1); other ranks flattened to (N, -1)."""
    t = t.detach()
    if t.ndim == 4:
        return t.float().mean(dim=(2, 3))
    if t.ndim == 1:
        return t.float()[:, None]
    return t.float().reshape(t.shape[0], -1)


# --------------------------------------------------------------------------------------------- batching

def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise FeatureError(f"expected an image batch as a numpy array or torch tensor, got {type(x).__name__}")


def _iter_batches(images: Images, batch_size: int) -> tuple[Iterator[Tensor], int | None]:
    """Normalise the accepted inputs to an iterator of float32 tensors, plus the image count when known."""
    if batch_size < 1:
        raise FeatureError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, (np.ndarray, Tensor)):
        if images.ndim < 2:
            raise FeatureError(f"expected images of shape (N, C, H, W), got shape {tuple(images.shape)}")
        n = int(images.shape[0])

        def cut() -> Iterator[Tensor]:
            for s in range(0, n, batch_size):
                yield _as_tensor(images[s:s + batch_size])
        return cut(), n

    if isinstance(images, (str, bytes, dict)) or not hasattr(images, "__iter__"):
        raise FeatureError(f"images must be an array/tensor (N, C, H, W) or an iterable of batches, "
                           f"got {type(images).__name__}")

    def stream() -> Iterator[Tensor]:
        for item in images:
            if isinstance(item, (tuple, list)):
                if len(item) < 2:
                    raise FeatureError("a batch given as a tuple must be (indices, images, ...) like "
                                       "ImageDataset.iter_batches yields")
                item = item[1]
            yield _as_tensor(item)
    return stream(), None  # the image count of a stream is unknown (len() would count batches)


@contextmanager
def _inference(model: nn.Module, device: str | torch.device) -> Iterator[torch.device]:
    """eval mode + no_grad on ``device``; the training flag and the parameters' device are restored afterwards."""
    was_training = model.training
    dev = torch.device(device)
    params = list(model.parameters()) + list(model.buffers())
    orig = params[0].device if params else None
    moved = orig is not None and orig != dev
    try:
        if moved:
            model.to(dev)
        model.eval()
        with torch.no_grad():
            yield dev
    finally:
        model.train(was_training)
        if moved:
            model.to(orig)


def _collect(model: nn.Module, images: Images, batch_size: int, device: str | torch.device,
             transform: Transform | None, progress: bool | str, fetch: Callable[[Tensor], Tensor],
             default_desc: str) -> np.ndarray:
    """Run ``fetch`` (one forward pass returning the rows to keep) over every batch; stack as float32 (N, F)."""
    batches, total = _iter_batches(images, batch_size)
    desc = progress if isinstance(progress, str) else default_desc
    rows: list[np.ndarray] = []
    with _inference(model, device) as dev, \
            tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x in batches:
            if x.shape[0] == 0:
                continue
            x = x.to(dev, dtype=torch.float32)
            shape = tuple(x.shape)
            if transform is not None:
                try:
                    x = transform(x)
                except Exception as e:  # noqa: BLE001 - re-raised with context
                    raise FeatureError(f"the input transform failed on a batch of shape {shape}: {e}") from e
            try:
                out = fetch(x)
            except FeatureError:
                raise
            except Exception as e:  # noqa: BLE001 - the network's own message is kept in ours
                raise FeatureError(f"the CNN rejected input of shape {tuple(x.shape)}: {e}") from e
            out = _to_rows(out).cpu().numpy().astype(np.float32, copy=False)
            if out.shape[0] != shape[0]:
                raise FeatureError(f"the layer returned {out.shape[0]} rows for a batch of {shape[0]} images; "
                                   f"choose a layer whose first axis is the batch")
            if rows and out.shape[1] != rows[0].shape[1]:
                raise FeatureError(f"the feature size changed between batches ({rows[0].shape[1]} -> "
                                   f"{out.shape[1]}); give images of one size")
            rows.append(out)
            bar.update(shape[0])
    if not rows:
        raise FeatureError("no images were given (the input is empty)")
    return np.concatenate(rows, axis=0)


# --------------------------------------------------------------------------------------------- public API

def extract_features(model: nn.Module, images: Images, layer: str | None = None, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool | str = False,
                     transform: Transform | None = None) -> np.ndarray:
    """Learned features of every image as float32 ``(N, F)``.

    ``layer=None``: the input of the final ``nn.Linear`` (see :func:`find_final_linear`; for an exported program,
    of its last linear operation). Otherwise the output of the named module, conv maps global-average pooled. ``transform`` (e.g. input normalisation) is applied to
    each float32 batch before the model. ``progress``: show a tqdm bar (its label when a string).
    """
    if getattr(model, "exported", False):       # a torch.export program: no modules to hook (models/exported.py)
        if layer is not None:
            raise FeatureError(f"layer {layer!r}: an exported (pt2) CNN offers only the input of its final Linear; "
                               f"explain it with the default layer, or register it with its architecture and "
                               f"state dict (flows.registry.register_cnn) to choose another layer")
        return _collect(model, images, batch_size, device, transform, progress, model.final_linear_input,
                        "features [final Linear input]")
    if layer is None:
        name = find_final_linear(model)
        target = dict(model.named_modules())[name]
    else:
        name, target = layer, _resolve_layer(model, layer)
    captured: list[Tensor] = []

    if layer is None:
        def hook(_mod: nn.Module, args: Any) -> None:
            if not captured:  # a layer called twice in one forward: keep its first call
                captured.append(_first_tensor(args))
        handle = target.register_forward_pre_hook(hook)
    else:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:  # type: ignore[misc]
            if not captured:
                captured.append(_first_tensor(out))
        handle = target.register_forward_hook(hook)

    def fetch(x: Tensor) -> Tensor:
        captured.clear()
        model(x)
        if not captured:
            raise FeatureError(f"layer {name!r} was not called during the forward pass; choose a layer the "
                               f"model uses")
        return captured[0]

    try:
        return _collect(model, images, batch_size, device, transform, progress, fetch, f"features [{name}]")
    finally:
        handle.remove()


def model_output(model: nn.Module, images: Images, batch_size: int = 256, device: str | torch.device = "cpu",
                 transform: Transform | None = None, progress: bool | str = False) -> np.ndarray:
    """The CNN's own output (logits / regression values) as float32 ``(N, O)``, batched like the features."""
    def fetch(x: Tensor) -> Tensor:
        return _first_tensor(model(x))
    return _collect(model, images, batch_size, device, transform, progress, fetch, "model output")

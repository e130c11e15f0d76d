"""Sequences on demand and their encodings (GIF, PNG strip, frames JSON): data in, bytes out, no I/O.

* **One forward pass per request.** Every frame of every requested component is one row of a single batch through
  the published generator (``models.cgan.generate_with``, under ``torch.inference_mode``), so a request costs one
  batched generator call.
* **Deterministic per seed, and the same convention as the published sweeps** (``models.sequences.render_sweep``):
  z = ``torch.randn(z_dim, generator=torch.Generator().manual_seed(seed))`` is shared by every frame, the swept
  component takes the sweep values and the others sit at ``base``. With seed 0, the published range and zero
  base, an on-demand sweep therefore reproduces the published ``frames_seed0``.
* **Uploads, patient-centred** (patient generator): :func:`patient_sweeps` places the uploaded image on the
  generator's template and edits *that image*; with the cGAN an upload's scores are rendered on a seed's noise.
* **Encodings** follow the published ones: the GIF is written by ``models.sequences.save_gif`` (boomerang, same
  upscaling rule); several components are placed side by side in each frame (GIF) or one row each (PNG strip).
"""
from __future__ import annotations

import base64
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.cgan import CGANConfig, generate_with
from models.sequences import save_gif

def sweep_frames(G: torch.nn.Module, gcfg: CGANConfig, components: list[int], values: np.ndarray, seed: int,
                 base: np.ndarray) -> np.ndarray:
    """Frames (n, F, image_channels, H, W) float in [0, 1] of 0-based ``components`` swept over ``values``
    (shape (F,) for all, or (n, F) one row per component), the other components at ``base`` (k,)."""
    n, k = len(components), gcfg.k
    vals = np.broadcast_to(np.asarray(values, np.float64), (n, np.shape(values)[-1]))
    F = vals.shape[1]
    c = np.repeat(np.asarray(base, np.float64)[None, None], n, 0).repeat(F, 1)        # (n, F, k)
    for i, j in enumerate(components):
        c[i, :, j] = vals[i]
    z = torch.randn(gcfg.z_dim, generator=torch.Generator().manual_seed(int(seed)))
    with torch.inference_mode():            # cheaper than generate_with's no_grad alone (no version counters)
        out = generate_with(G, z[None].repeat(n * F, 1), torch.from_numpy(c.reshape(n * F, k).astype(np.float32)))
    return out.numpy().reshape(n, F, *out.shape[1:])[:, :, :gcfg.image_channels]


def patient_sweeps(G, x: torch.Tensor, scores: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, dict]:
    """Patient-centred sweeps of one upload x (1, C, H, W) in [0, 1] along every component over ``values``
    (k, F): frames (k, F, C, H, W) and the placement (see :meth:`PatientGenerator.sweep_image`)."""
    frames, placement = G.sweep_image(x, torch.as_tensor(scores), torch.as_tensor(values, dtype=torch.float32))
    return frames.numpy(), placement


def to_u8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _scale(h: int, w: int) -> int:
    """The published GIFs' rule: the smallest integer upscaling that makes one frame >= 128 px."""
    return max(1, math.ceil(128 / max(h, w)))


def gif_bytes(frames: np.ndarray) -> bytes:
    """Animated GIF of (n, F, C, H, W) frames, the n components side by side in every frame."""
    row = np.concatenate(list(np.asarray(frames, np.float32)), axis=-1)               # (F, C, H, n*W)
    with tempfile.NamedTemporaryFile(suffix=".gif") as f:
        save_gif(row, f.name, scale=_scale(*frames.shape[-2:]))
        return Path(f.name).read_bytes()


def _png(u8: np.ndarray, scale: int = 1) -> bytes:
    """PNG of a (C, H, W) uint8 image (C = 1 or 3), upscaled by nearest neighbour."""
    img = u8.repeat(scale, 1).repeat(scale, 2)
    pil = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def strip_png(frames: np.ndarray) -> bytes:
    """PNG grid of (n, F, C, H, W) frames: one row per component, the sweep from left to right."""
    u8 = to_u8(frames)
    n, F, C, H, W = u8.shape
    grid = u8.transpose(2, 0, 3, 1, 4).reshape(C, n * H, F * W)
    return _png(grid, _scale(H, W))


def frames_json(values: np.ndarray, frames_u8: np.ndarray) -> dict:
    """Frames of one component as JSON: sweep values and one PNG data URL per frame ((F, C, H, W) uint8)."""
    return {"values": [round(float(v), 6) for v in values], "height": int(frames_u8.shape[-2]),
            "width": int(frames_u8.shape[-1]), "channels": int(frames_u8.shape[1]),
            "frames": [data_url(_png(f), "image/png") for f in frames_u8]}


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def published_frames(npz_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(values, frames (F, C_img, H, W) uint8) of a published component's npz (seed 0, image channels)."""
    with np.load(npz_path, allow_pickle=False) as z:
        ic = int(z["image_channels"])
        return z["values"].astype(np.float64), z["frames_seed0"][:, :ic]

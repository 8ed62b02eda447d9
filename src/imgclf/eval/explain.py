"""Class activation maps with the ``grad-cam`` package (pytorch-grad-cam), for CNNs and ViTs.

The target layer comes from timm's model contract: for CNNs the last feature stage
(``feature_info[-1]``); for token models (ViT-style, 3-D ``forward_features``) the first norm of the
last block, with a reshape of the patch tokens to a grid (prefix tokens dropped). Methods:
``gradcam`` (Grad-CAM), ``gradcam++``, ``layercam`` and ``eigencam`` (gradient-free).

Example:
    >>> explain_image("runs/x", "photo.jpg", "photo_cam.png", method="gradcam")  # doctest: +SKIP
    {'label': 'cat', 'prob': 0.93, 'method': 'gradcam', 'output': 'photo_cam.png'}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..artifact import load_artifact, require
from ..data.images import MAX_ASPECT, PILLOW_MAX_PIXELS, BadImage, open_image
from ..data.preprocess import Preprocess
from ..data.sources import nfc
from ..errors import ImgclfError
from .inference import run_decode_policy
from .trust import Trust

METHODS = ("gradcam", "gradcam++", "layercam", "eigencam")


def _cam_class(method: str):
    import pytorch_grad_cam as pgc

    classes = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
               "eigencam": pgc.EigenCAM}  # fmt: skip
    if method not in classes:
        raise ImgclfError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    return classes[method]


def target_layer(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, Any]:
    """(layer, reshape_transform or None) for CAMs of a timm model."""
    p = next(model.parameters())
    with torch.no_grad():
        fmap = model.forward_features(torch.zeros(1, 3, *input_size, device=p.device, dtype=p.dtype))
    if fmap.ndim == 3 and hasattr(model, "blocks"):  # tokens: (B, N, C)
        prefix = getattr(model, "num_prefix_tokens", 1)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)

        def reshape(t: torch.Tensor) -> torch.Tensor:
            t = t[:, prefix:]
            h, w = grid if grid is not None else (int(t.shape[1] ** 0.5),) * 2
            return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)  # (B, C, h, w)

        return model.blocks[-1].norm1, reshape
    info = getattr(model, "feature_info", None)
    name = info[-1]["module"] if info else None
    modules = dict(model.named_modules())
    if name in modules:
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin: channels-last feature maps
        return modules[name], ((lambda t: t.permute(0, 3, 1, 2)) if nhwc else None)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ImgclfError(f"no layer to explain in {type(model).__name__} (no feature_info, blocks or conv)")
    return convs[-1], None


def cam_maps(model: nn.Module, x: torch.Tensor, targets: list[int], method: str = "gradcam") -> np.ndarray:
    """(B, H, W) CAMs in [0, 1] for a batch of preprocessed images and their target classes."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = target_layer(model, tuple(x.shape[-2:]))
    model.eval()
    p = next(model.parameters())
    # an input that needs gradients keeps the graph alive when the backbone is frozen (probe runs)
    x = x.to(p.device, p.dtype).detach().requires_grad_(True)
    with torch.enable_grad(), _cam_class(method)(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def overlay(img: Image.Image, pre: Preprocess, cam: np.ndarray) -> np.ndarray:
    """The image as the model saw it (resize + centre crop) with the CAM as a heat map (H, W, 3) uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    seen = pre.view()(img)  # (3, H, W) in [0, 1]
    rgb = seen.permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.55)


def explain_image(
    run_dir: str | Path,
    image: str | Path,
    output: str | Path | None = None,
    *,
    method: str = "gradcam",
    target: str | None = None,
    device: str = "cpu",
    max_pixels: int | None = PILLOW_MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> dict[str, Any]:
    """Write ``output`` (default ``<image>_<method>.png``): the image (decoded as the run decodes its data,
    within ``max_pixels``/``max_aspect``) and its CAM for ``target`` (a class name, or the prediction)."""
    model, art = load_artifact(run_dir, device)
    require(art, "explain")
    try:
        img = open_image(image, run_decode_policy(art, max_pixels, max_aspect))
    except BadImage as e:
        raise ImgclfError(f"{e.source}: {e.reason}") from None
    x = art.preprocessing.eval()(img)[None].to(device)
    with torch.no_grad():
        probs = Trust.load(run_dir, art).probs(model(x))[0].cpu()
    if target is None:
        cls = int(probs.argmax())
    elif nfc(target) in art.class_names:
        cls = art.class_names.index(nfc(target))
    else:
        raise ImgclfError(f"--target '{target}' is not a class of {run_dir} ({', '.join(art.class_names[:10])})")
    cam = cam_maps(model, x, [cls], method)[0]
    out = Path(output) if output else Path(image).with_name(f"{Path(image).stem}_{method.replace('+', 'p')}.png")
    side_by_side(img, art.preprocessing, cam, f"{art.class_names[cls]} {100 * float(probs[cls]):.1f}% ({method})", out)
    return {"label": art.class_names[cls], "prob": float(probs[cls]), "method": method, "output": str(out)}


def side_by_side(img: Image.Image, pre: Preprocess, cam: np.ndarray, title: str, out: Path) -> None:
    """Save the model's view and the overlay next to each other with a title."""
    from ..io import atomic_write
    from ..plots import figure

    seen = pre.view()(img).permute(1, 2, 0).clamp(0, 1).numpy()
    fig = figure(6.0, 3.3)
    for i, (pic, name) in enumerate([(seen, "input"), (overlay(img, pre, cam), title)]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(pic)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))

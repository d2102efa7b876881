"""Standard FID in torchvision Inception-v3 pool features, from local weights only
(`train_evaluator.inception_weights`; never downloads): what the validate report adds as
`inception_fid` when weights are given, beside the evaluator-feature FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tasks.shared.images import resolve_device
from tasks.shared.metrics import frechet_distance

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def load_inception(weights_path: Path | str) -> nn.Module:
    """torchvision's inception_v3 from a local state_dict (.pth or .safetensors), with the
    classifier removed: forward gives the 2048-d pool features. Never downloads."""
    from torchvision.models import inception_v3

    path = Path(weights_path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    aux = any(key.startswith("AuxLogits.") for key in state)  # torchvision's file has them
    # transform_input=True: torchvision's ImageNet weights expect it (as weights= would set).
    model = inception_v3(weights=None, aux_logits=aux, transform_input=True, init_weights=False)
    model.load_state_dict(state)
    model.fc = nn.Identity()
    return model.eval()


@torch.no_grad()
def inception_features(
    model: nn.Module, images: Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> Tensor:
    """uint8 (N, 1|3, H, W) -> (N, 2048): grey repeated to RGB, bilinear resize to 299."""
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    model = model.to(device)
    out = []
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size].to(device).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        out.append(model((x - mean) / std).float().cpu())
    return torch.cat(out)


def inception_fid(
    real_uint8: Tensor,
    fake_uint8: Tensor,
    weights_path: Path | str | None,
    device: str | torch.device = "cpu",
) -> float | None:
    """FID in torchvision Inception-v3 pool features; None when no local weights are given.

    torchvision's ImageNet weights differ from the TF-ported ones published FIDs use, so the
    figure tracks, but does not equal, numbers from pytorch-fid or torch-fidelity.
    """
    if weights_path is None:
        return None
    device = resolve_device(device) if isinstance(device, str) else device
    model = load_inception(weights_path)
    real = inception_features(model, real_uint8, device=device)
    fake = inception_features(model, fake_uint8, device=device)
    return frechet_distance(real, fake)


def standard_fid(
    train_uint8: Tensor,
    test_uint8: Tensor,
    fake_uint8: Tensor,
    weights_path: Path | str,
    device: str | torch.device = "cpu",
) -> dict:
    """Inception FID of the synthetic images against the real train split, beside the real
    train-vs-test floor: the validate report's `inception_fid` when weights are given."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = load_inception(weights_path)
    train = inception_features(model, train_uint8, device=device)
    return {
        "fid": frechet_distance(train, inception_features(model, fake_uint8, device=device)),
        "fid_real_floor": frechet_distance(
            train, inception_features(model, test_uint8, device=device)
        ),
        "weights": str(weights_path),
    }

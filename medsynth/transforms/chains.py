"""Transform chains built from MONAI dictionary transforms.

Every chain works on ``{"image": ..., "label": ...}`` dictionaries of channel-first arrays and
keeps the affine on MONAI ``MetaTensor``s, so geometry survives each step.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    RandAffined,
    RandFlipd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

KEYS = ("image", "label")
INTENSITY_MODES = ("percentile", "window")


class ForegroundPercentileScaled(MapTransform):
    """Scale intensities so the given percentiles *inside the label foreground* map to 0 and 1.

    Percentiles over the whole volume are dominated by background air; taking them inside the
    labelled region makes the scaling follow the tissue. Values are clipped to [0, 1].
    """

    def __init__(self, keys: KeysCollection, *, mask_key: str = "label", lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.mask_key, self.lower, self.upper = mask_key, lower, upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        mask = torch.as_tensor(d[self.mask_key]) > 0
        for key in self.key_iterator(d):
            image = d[key]
            values = torch.as_tensor(image)[mask.expand_as(torch.as_tensor(image))].float()
            if values.numel() == 0:
                values = torch.as_tensor(image).float().reshape(-1)
            lo, hi = np.percentile(values.cpu().numpy(), [self.lower, self.upper])
            scale = 1.0 / max(float(hi - lo), 1e-8)
            d[key] = ((image - float(lo)) * scale).clamp(0.0, 1.0)
        return d


def intensity_scaling(
    intensity: str, *, window: Sequence[float] | None = None, lower_percentile: float = 0.5, upper_percentile: float = 99.5
) -> MapTransform:
    """The intensity step of :func:`volume_preprocessing`, on ``{"image", "label"}`` channel-first arrays.

    Args:
        intensity: ``percentile`` (foreground percentiles to [0, 1]) or ``window`` (``window`` clipped
            and mapped to [0, 1]).
        window: ``(low, high)`` for the ``window`` mode.
        lower_percentile: Foreground percentile mapped to 0.
        upper_percentile: Foreground percentile mapped to 1.

    Raises:
        ValueError: On an unknown mode or a window that is not ``low < high``.
    """
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity mode must be one of {INTENSITY_MODES}, got {intensity!r}")
    if intensity == "window":
        if window is None or len(window) != 2 or not float(window[0]) < float(window[1]):
            raise ValueError(f"the window intensity mode needs window=(low, high) with low < high, got {window}")
        return ScaleIntensityRanged(keys="image", a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True)
    return ForegroundPercentileScaled(keys="image", lower=lower_percentile, upper=upper_percentile)


def volume_preprocessing(
    *,
    spacing: Sequence[float],
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    spatial_size: Sequence[int] | None = None,
    margin: int = 2,
    intensity: str = "percentile",
    window: Sequence[float] | None = None,
) -> Compose:
    """Chain that brings an image/label volume to the dataset's geometry and intensity range.

    Steps: reorient to RAS, resample to ``spacing`` (bilinear image, nearest label), scale
    intensities to [0, 1] (by foreground percentiles, the MR preset, or by a fixed window, the CT
    preset in Hounsfield units), crop to the label's bounding box plus ``margin``, then centre
    pad/crop to ``spatial_size``.

    Args:
        spacing: Target voxel spacing in mm, one value per spatial axis.
        lower_percentile: Foreground percentile mapped to 0.
        upper_percentile: Foreground percentile mapped to 1.
        spatial_size: Size per spatial axis after centre pad/crop; -1 keeps an axis as it is.
            ``None`` skips the pad/crop.
        margin: Voxels kept around the label's bounding box.
        intensity: ``percentile`` (foreground percentiles to [0, 1]) or ``window`` (``window``
            clipped and mapped to [0, 1]).
        window: ``(low, high)`` intensities mapped to 0 and 1 by the ``window`` mode, for
            example ``(-1000, 1000)`` HU for CT.

    Returns:
        A MONAI ``Compose`` taking and returning ``{"image", "label"}`` channel-first MetaTensors.

    Raises:
        ValueError: On an unknown intensity mode or a window that is not ``low < high``.
    """
    scaling = intensity_scaling(intensity, window=window, lower_percentile=lower_percentile, upper_percentile=upper_percentile)
    steps: list = [
        Orientationd(keys=KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # float64 would double the peak (MONAI takes a torch dtype here, though its annotation names numpy's)
        Spacingd(keys=KEYS, pixdim=tuple(spacing), mode=("bilinear", "nearest"), dtype=torch.float32),  # type: ignore[arg-type]
        scaling,
        CropForegroundd(keys=KEYS, source_key="label", margin=margin, allow_smaller=True),
    ]
    if spatial_size is not None:
        steps.append(ResizeWithPadOrCropd(keys=KEYS, spatial_size=[int(s) for s in spatial_size]))
    return Compose(steps)


def label_augmentation(
    *,
    flip_prob: float = 0.5,
    rotate_range: float = 0.1,
    scale_range: float = 0.05,
    translate_range: float = 2.0,
    spatial_dims: int = 2,
) -> Compose:
    """Random flips and small affine changes of a label map (nearest-neighbour, no new labels).

    Used to vary the label maps that condition generation without inventing anatomy.

    Args:
        flip_prob: Probability of a flip along the first spatial axis (left-right after RAS).
        rotate_range: Largest rotation in radians, about each rotation axis.
        scale_range: Largest relative zoom change.
        translate_range: Largest shift in voxels.
        spatial_dims: 2 or 3.

    Returns:
        A MONAI ``Compose`` over the key ``"label"``; call ``set_random_state`` for reproducibility.
    """
    n_rot = 1 if spatial_dims == 2 else 3
    return Compose(
        [
            RandFlipd(keys="label", prob=flip_prob, spatial_axis=0),
            RandAffined(
                keys="label",
                prob=1.0,
                rotate_range=[rotate_range] * n_rot,
                scale_range=[scale_range] * spatial_dims,
                translate_range=[translate_range] * spatial_dims,
                mode="nearest",
                padding_mode="zeros",
            ),
        ]
    )

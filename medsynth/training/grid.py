"""The sample grid training logs at its checkpoints: fixed seeds, the first validation records' conditions."""

from __future__ import annotations

import numpy as np

from medsynth.data import LabelledArrays
from medsynth.diffusion.generator import Generator
from medsynth.io import colorize_labels, display_slice, picture_sheet


def sample_sheet(generator: Generator, data: LabelledArrays, *, num: int, steps: int, seed: int) -> np.ndarray:
    """Samples with fixed seeds as a picture sheet, one row per record of ``data`` whose condition they were given.

    Columns: the label map (generated, or given to a ``mask`` model), the synthetic image, and the
    real record. A label-map generator's rows show generated and real label maps.

    Args:
        generator: The generator to sample (train's EMA model).
        data: Records whose label maps and attribute codes condition the samples.
        num: Rows (at most ``len(data)``).
        steps: Sampler steps.
        seed: Seed of the first row; row ``i`` uses ``seed + i``.

    Returns:
        The sheet as an RGB ``uint8`` array.
    """
    num = min(num, len(data))
    samples = generator.sample([seed + i for i in range(num)], labels=data.labels[:num], codes=data.codes[:num], steps=steps)
    shown = samples.labels if samples.labels is not None else data.labels[:num]
    rows = []
    for i in range(num):
        row = [colorize_labels(display_slice(shown[i, 0].numpy()))]
        if samples.images is not None:
            row += [display_slice(samples.images[i, 0].numpy()), display_slice(data.images[i, 0].numpy())]
        else:
            row += [colorize_labels(display_slice(data.labels[i, 0].numpy()))]
        rows.append(row)
    titles = ["label", "synthetic", "real"] if samples.images is not None else ["generated label", "real label"]
    return picture_sheet(rows, titles=titles)

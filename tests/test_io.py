"""Tests for medsynth.io: atomic writes, NIfTI round trips, PNG previews and picture sheets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsynth import MedsynthError
from medsynth.io import (
    atomic_path,
    colorize_labels,
    load_nifti,
    picture_sheet,
    save_nifti,
    save_png,
    write_json,
    write_text,
)


def _affine(spacing: tuple[float, float, float] = (1.5, 2.0, 3.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 20.0, -30.5]
    return affine


# --- atomic_path -----------------------------------------------------------------------


def test_atomic_path_success_renames(tmp_path: Path) -> None:
    """A successful block leaves exactly the final file with the written content."""
    final = tmp_path / "sub" / "out.nii.gz"
    with atomic_path(final) as tmp:
        assert tmp != final
        assert tmp.parent == final.parent
        assert tmp.name.endswith(".nii.gz")
        assert not final.exists()
        tmp.write_bytes(b"payload")
    assert final.read_bytes() == b"payload"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out.nii.gz"]


def test_atomic_path_failure_leaves_nothing(tmp_path: Path) -> None:
    """An error inside the block leaves neither the final file nor the temporary file."""
    final = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_previous_file(tmp_path: Path) -> None:
    """A failed rewrite does not touch an existing file under the final name."""
    final = tmp_path / "keep.txt"
    final.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            tmp.write_text("new")
            raise ValueError
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_write_text_and_json(tmp_path: Path) -> None:
    """write_text and write_json create parents, return the path and write the content."""
    text_path = write_text(tmp_path / "a" / "note.txt", "héllo\n")
    assert text_path == tmp_path / "a" / "note.txt"
    assert text_path.read_text(encoding="utf-8") == "héllo\n"

    data = {"b": [1, 2.5, None], "a": {"nested": "x"}}
    json_path = write_json(tmp_path / "b" / "data.json", data)
    assert json.loads(json_path.read_text()) == data
    assert json_path.read_text().endswith("\n")
    # Overwrite is atomic and leaves no temporary files.
    write_json(json_path, {"c": 1})
    assert json.loads(json_path.read_text()) == {"c": 1}
    assert [p.name for p in json_path.parent.iterdir()] == ["data.json"]


# --- NIfTI ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path: Path, suffix: str) -> None:
    """Array, affine and header spacing survive save_nifti/load_nifti."""
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    affine = _affine()
    path = save_nifti(tmp_path / f"img{suffix}", array, affine)
    assert path == tmp_path / f"img{suffix}"

    loaded, loaded_affine = load_nifti(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine)
    assert loaded_affine.dtype == np.float64

    header = nib.load(str(path)).header
    np.testing.assert_allclose(header.get_zooms()[:3], (1.5, 2.0, 3.0))
    assert header.get_xyzt_units()[0] == "mm"
    assert [p.name for p in tmp_path.iterdir()] == [f"img{suffix}"]


def test_nifti_rotated_affine_spacing(tmp_path: Path) -> None:
    """Spacing in the header follows the affine's column norms, also for a flipped/permuted affine."""
    affine = np.array(
        [[0.0, -2.0, 0.0, 5.0], [-0.5, 0.0, 0.0, 6.0], [0.0, 0.0, 4.0, 7.0], [0.0, 0.0, 0.0, 1.0]]
    )
    path = save_nifti(tmp_path / "rot.nii.gz", np.zeros((3, 4, 5), np.float32), affine)
    _, loaded_affine = load_nifti(path)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-6)
    np.testing.assert_allclose(nib.load(str(path)).header.get_zooms()[:3], (0.5, 2.0, 4.0), rtol=1e-6)


def test_nifti_2d_array_saved_as_single_slice(tmp_path: Path) -> None:
    """A 2D array is stored as an (H, W, 1) volume."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_nifti(tmp_path / "flat.nii.gz", array, np.eye(4))
    loaded, _ = load_nifti(path)
    assert loaded.shape == (3, 4, 1)
    np.testing.assert_array_equal(loaded[..., 0], array)


def test_nifti_uint8_dtype(tmp_path: Path) -> None:
    """dtype=np.uint8 stores a label map as uint8 on disk with exact values."""
    labels = np.array([[[0, 1], [2, 3]], [[255, 0], [7, 1]]], dtype=np.int64)
    path = save_nifti(tmp_path / "lab.nii.gz", labels, _affine(), dtype=np.uint8)
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    loaded, _ = load_nifti(path, dtype=np.uint8)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, labels.astype(np.uint8))
    as_float, _ = load_nifti(path)
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, labels.astype(np.float32))


def test_load_nifti_missing_file(tmp_path: Path) -> None:
    """A missing file raises MedsynthError naming the path."""
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(MedsynthError) as info:
        load_nifti(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("name", ["junk.nii", "junk.nii.gz", "junk.txt"])
def test_load_nifti_not_nifti(tmp_path: Path, name: str) -> None:
    """A file that is not NIfTI raises MedsynthError naming the path."""
    path = tmp_path / name
    path.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(MedsynthError) as info:
        load_nifti(path)
    assert str(path) in str(info.value)


def test_load_nifti_directory_is_not_a_file(tmp_path: Path) -> None:
    """A folder passed as the path raises MedsynthError, not IsADirectoryError."""
    folder = tmp_path / "dir.nii.gz"
    folder.mkdir()
    with pytest.raises(MedsynthError, match="dir.nii.gz"):
        load_nifti(folder)


# --- PNG --------------------------------------------------------------------------------


def test_save_png_float(tmp_path: Path) -> None:
    """Float images are clipped to [0, 1] and scaled to 0..255 with rounding."""
    image = np.array([[-0.5, 0.0, 0.5], [1.0, 2.0, 0.25]], dtype=np.float32)
    path = save_png(tmp_path / "f.png", image)
    with Image.open(path) as img:
        assert img.mode == "L"
        back = np.asarray(img)
    np.testing.assert_array_equal(back, [[0, 0, 128], [255, 255, 64]])


def test_save_png_uint8_grey_and_rgb(tmp_path: Path) -> None:
    """uint8 grey and RGB images are written unchanged."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    with Image.open(save_png(tmp_path / "g.png", grey)) as img:
        np.testing.assert_array_equal(np.asarray(img), grey)
    with Image.open(save_png(tmp_path / "c.png", rgb)) as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "g.png"]


def test_colorize_labels() -> None:
    """Background is black; distinct label values get distinct colours; output is uint8 RGB."""
    label = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 1, 1]])
    rgb = colorize_labels(label)
    assert rgb.shape == (3, 4, 3)
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[label == 0], 0)
    colours = {v: tuple(rgb[label == v][0]) for v in range(9)}
    assert len(set(colours.values())) == 9
    for v in range(1, 9):
        assert colours[v] != (0, 0, 0)
    # The same value always maps to the same colour.
    np.testing.assert_array_equal(rgb[2, 2], rgb[2, 3])
    np.testing.assert_array_equal(rgb[2, 2], rgb[0, 1])


def test_colorize_labels_large_values_never_black() -> None:
    """Values past the palette repeat foreground colours, never background black."""
    rgb = colorize_labels(np.arange(1, 30).reshape(1, -1))
    assert np.all(rgb.reshape(-1, 3).any(axis=1))


@pytest.mark.parametrize("scale,pad", [(1, 0), (2, 2), (3, 1)])
def test_picture_sheet_shape(scale: int, pad: int) -> None:
    """The sheet size follows rows, columns, scale and padding; tiles are placed unchanged."""
    h, w = 4, 5
    grey = np.full((h, w), 1.0)
    colour = np.zeros((h, w, 3), dtype=np.uint8)
    colour[..., 0] = 200
    rows = [[grey, colour, grey], [colour, grey, colour]]
    sheet = picture_sheet(rows, scale=scale, pad=pad)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (2 * (h * scale + pad) + pad, 3 * (w * scale + pad) + pad, 3)
    # First tile (white) and second tile (red) of the first row.
    y, x = pad, pad
    np.testing.assert_array_equal(sheet[y : y + h * scale, x : x + w * scale], 255)
    x2 = pad + (w * scale + pad)
    np.testing.assert_array_equal(sheet[y : y + h * scale, x2 : x2 + w * scale, 0], 200)
    np.testing.assert_array_equal(sheet[y : y + h * scale, x2 : x2 + w * scale, 1:], 0)


def test_picture_sheet_titles_add_header() -> None:
    """Titles add a header band above the tiles and draw something in it."""
    rows = [[np.zeros((6, 6)), np.zeros((6, 6))]]
    plain = picture_sheet(rows, scale=2, pad=2)
    titled = picture_sheet(rows, titles=["real", "fake"], scale=2, pad=2)
    extra = titled.shape[0] - plain.shape[0]
    assert extra > 0
    assert titled.shape[1:] == plain.shape[1:]
    np.testing.assert_array_equal(titled[extra:], plain)
    assert np.any(titled[:extra] != 40)


def test_display_slice_orients_and_takes_the_middle_of_a_volume() -> None:
    from medsynth.io import display_slice

    plane = np.arange(6).reshape(2, 3)  # (X, Y)
    shown = display_slice(plane)
    assert shown.shape == (3, 2) and shown[0, 0] == plane[0, -1]  # top row = highest Y (anterior)
    volume = np.stack([plane * 0, plane, plane * 2], axis=-1)  # Z = 3, middle slice = plane
    np.testing.assert_array_equal(display_slice(volume), shown)

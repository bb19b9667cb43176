"""Memory that does not grow with the dataset (issue 13, item 1).

Decoded images and features are cache files streamed row by row to disk and read back as
read-only memory maps, a batch of rows at a time. These tests check the contract (memory-mapped,
read-only, bit-identical to the in-memory path), the resident set while every row is read, and
that a failed or killed writer leaves no partial file under a cache entry's name.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import imgcls.data.cache as cache_module
from imgcls.core.config import Strategy
from imgcls.data.arrays import NpyStream, take_rows
from imgcls.data.cache import (
    DecodedImages,
    cache_file,
    decoded_images,
    decoded_key,
    remove_stale_partial_files,
)
from imgcls.data.folders import data_version, scan_image_folder
from imgcls.data.images import ImageReadError, load_rgb
from imgcls.modeling.crossval import prepare_inputs
from imgcls.modeling.features import cached_features, embed_batches, embed_images
from imgcls.modeling.models import build_backbone
from tests.conftest import write_dataset

CPU = torch.device("cpu")


def _rss_kib(field: str) -> int:
    """This process's ``RssAnon`` or ``RssFile`` in KiB (/proc/self/status, proc(5))."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def _serial(folder, size: int) -> np.ndarray:
    return np.stack([load_rgb(p, size).transpose(2, 0, 1) for p in folder.paths])


def _is_read_only_map(array: np.ndarray) -> bool:
    return (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and not array.flags.writeable
    )


def test_decoded_images_come_back_read_only_memory_mapped(image_dataset, isolated_cache):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    decoder = DecodedImages(folder, 32, md5, workers=2)
    assert _is_read_only_map(decoder.array)  # while decoding: the temporary file, mapped
    cold = decoder.result()
    warm = decoded_images(folder, 32, md5)
    for array in (cold, warm):
        assert _is_read_only_map(array)
        assert Path(array.filename) == cache_file("decoded", decoded_key(folder, 32, md5))
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0, 0, 0] = 1
    assert np.array_equal(cold, _serial(folder, 32)) and np.array_equal(warm, cold)


def test_streamed_features_are_bit_identical_and_a_truncated_file_is_rebuilt(
    image_dataset, isolated_cache
):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    cold, hit = cached_features(folder, "resnet18", "none", 32, md5, CPU)
    assert not hit and _is_read_only_map(cold)
    warm, hit = cached_features(folder, "resnet18", "none", 32, md5, CPU)
    assert hit and _is_read_only_map(warm)
    backbone, _, prep = build_backbone("resnet18", "none", 32)
    in_memory = embed_images(backbone, _serial(folder, 32), prep, CPU)
    assert np.array_equal(cold, in_memory) and np.array_equal(warm, in_memory)
    # blocks smaller than the split, batches that do not divide it: the same rows, in order
    images = decoded_images(folder, 32, md5)
    blocks = list(embed_batches(backbone, images, prep, CPU, 5, flush_rows=7))
    assert [start for start, _ in blocks] == [0, 10, 20]
    assert np.array_equal(
        np.concatenate([b for _, b in blocks]),
        embed_images(backbone, _serial(folder, 32), prep, CPU, batch_size=5),
    )
    # a truncated feature file is detected and rebuilt (the maps of it are not read again: SIGBUS)
    path = Path(warm.filename)
    del cold, warm
    path.write_bytes(path.read_bytes()[:-100])
    again, hit = cached_features(folder, "resnet18", "none", 32, md5, CPU)
    assert not hit and np.array_equal(again, in_memory)


def test_training_inputs_are_memory_mapped_and_batches_are_their_rows(
    image_dataset, isolated_cache
):
    folder = scan_image_folder(image_dataset / "train")
    md5 = data_version(image_dataset)
    rows = torch.tensor([5, 0, 17, 5])
    common = {"backbone": "resnet18", "weights": "none", "image_size": 32, "folds": 2}
    for frozen in (True, False):
        strategy = Strategy(**common, freeze_backbone=frozen, augment=False)
        inputs, _ = prepare_inputs(strategy, folder, md5, "cpu")
        assert _is_read_only_map(inputs.inputs)
        batch = inputs.batch(rows, None)
        expected = torch.from_numpy(np.array(inputs.inputs)[rows.numpy()])
        if frozen:
            assert torch.equal(batch, expected)
        else:
            assert batch.shape == (4, 3, 32, 32) and torch.equal(batch[0], batch[3])
            assert not torch.equal(batch[0], batch[1])


def test_reading_every_row_keeps_the_mapped_pages_to_about_one_batch(tmp_path, isolated_cache):
    data = write_dataset(tmp_path / "big" / "train", {"forest": 60, "sea": 60}, seed=3)
    folder = scan_image_folder(data, validate=False)
    anon_before = _rss_kib("RssAnon")
    images = decoded_images(folder, 256, "v-rss")  # 120 x 196,608 bytes = 23 MB
    size_kib = images.nbytes // 1024
    # decoding wrote rows to the file, none of them stayed in this process's memory
    assert _rss_kib("RssAnon") - anon_before < size_kib // 3
    order = np.random.default_rng(0).permutation(len(images))
    file_before = _rss_kib("RssFile")
    seen = 0
    for start in range(0, len(order), 8):
        seen += int(take_rows(images, order[start : start + 8]).sum() > 0)
    streamed = _rss_kib("RssFile") - file_before
    assert seen == len(range(0, len(order), 8))
    assert streamed < 4 * 1024, f"{streamed} KiB of a {size_kib} KiB file stayed mapped"
    # the same reads without dropping the pages keep the whole file mapped: the check can fail
    for start in range(0, len(order), 8):
        images[order[start : start + 8]].sum()
    assert _rss_kib("RssFile") - file_before > 0.8 * size_kib


def test_a_failed_decode_leaves_no_partial_file_and_the_next_call_rebuilds(
    image_dataset, isolated_cache, monkeypatch
):
    folder = scan_image_folder(image_dataset / "train", validate=False)
    broken = folder.paths[9]
    real = cache_module.load_rgb

    def fail_on_one(path: Path, size: int) -> np.ndarray:
        if path == broken:
            raise ImageReadError(path, "simulated failure")
        return real(path, size)

    monkeypatch.setattr(cache_module, "load_rgb", fail_on_one)
    decoder = DecodedImages(folder, 24, "v-fail", workers=3)
    with pytest.raises(ImageReadError, match="simulated failure"):
        decoder.result()
    assert list((isolated_cache / "decoded").iterdir()) == []  # no entry, no temporary file
    monkeypatch.setattr(cache_module, "load_rgb", real)
    rebuilt = DecodedImages(folder, 24, "v-fail")
    assert not rebuilt.hit and np.array_equal(rebuilt.result(), _serial(folder, 24))


def test_a_killed_decode_leaves_no_entry_and_its_partial_file_is_swept_at_once(
    image_dataset, isolated_cache
):
    folder = scan_image_folder(image_dataset / "train", validate=False)
    child = textwrap.dedent(
        f"""
        import time
        import imgcls.data.cache as cache
        from imgcls.data.folders import scan_image_folder
        real = cache.load_rgb
        def slow(path, size):
            time.sleep(0.2)
            return real(path, size)
        cache.load_rgb = slow
        folder = scan_image_folder({str(folder.root)!r}, validate=False)
        cache.DecodedImages(folder, 24, "v-kill", workers=1).result()
        """
    )
    env = {**os.environ, "IMGCLS_CACHE_DIR": str(isolated_cache)}
    process = subprocess.Popen([sys.executable, "-c", child], env=env)
    decoded = isolated_cache / "decoded"
    deadline = time.monotonic() + 60
    while not list(decoded.glob(".*.tmp")) and time.monotonic() < deadline:
        assert process.poll() is None, "the decoding process ended before it was killed"
        time.sleep(0.05)
    time.sleep(0.5)  # a few rows in
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = list(decoded.glob(".*.tmp"))
    assert len(partial) == 1 and not list(decoded.glob("*.npy"))
    assert remove_stale_partial_files() == partial  # fresh, but its writer is dead
    again = DecodedImages(folder, 24, "v-kill")
    assert not again.hit and np.array_equal(again.result(), _serial(folder, 24))


def test_an_unfinished_stream_is_removed_when_its_process_exits(tmp_path):
    child = textwrap.dedent(
        f"""
        import os
        import sys
        from pathlib import Path
        import numpy as np
        from imgcls.data.arrays import NpyStream
        stream = NpyStream(Path({str(tmp_path / "x.npy")!r}), (4, 3), np.float32)
        stream.write(0, np.ones((2, 3)))
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a forked child's exit leaves its parent's file alone
        os.waitpid(child, 0)
        print(stream.tmp.exists())
        sys.exit(0)
        """
    )
    shown = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert shown.stdout.strip() == "True", shown.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stream_refuses_rows_that_do_not_fit_and_publishes_what_was_written(tmp_path):
    path = tmp_path / "f.npy"
    with NpyStream(path, (5, 2), np.float32) as stream:
        with pytest.raises(ValueError, match=r"f\.npy: rows 4\.\.6"):
            stream.write(4, np.zeros((2, 2)))
        with pytest.raises(ValueError, match="do not fit"):
            stream.write(0, np.zeros((1, 3)))
        stream.write(0, np.arange(6).reshape(3, 2))
        stream.write(3, np.arange(6, 10).reshape(2, 2))
        assert np.array_equal(stream.array[:3], np.arange(6).reshape(3, 2))  # readable at once
        published = stream.publish()
    assert _is_read_only_map(published) and published.dtype == np.float32
    assert np.array_equal(np.load(path), np.arange(10, dtype=np.float32).reshape(5, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]


def test_predict_folder_streams_the_memory_mapped_images(image_dataset, isolated_cache):
    from imgcls.evaluation.evaluate import predict_folder
    from imgcls.modeling.features import to_model_input
    from imgcls.modeling.models import build_classifier

    folder = scan_image_folder(image_dataset / "train")
    model, prep = build_classifier("resnet18", "none", 32, 2, 0.0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "array is not writable"
        probs = predict_folder(model, prep, folder, "v-predict", "cpu", batch_size=16)
    images = torch.from_numpy(_serial(folder, 32))
    with torch.inference_mode():
        expected = [
            torch.softmax(model(to_model_input(images[i : i + 16], prep, CPU)).float(), dim=1)
            for i in range(0, len(images), 16)
        ]
    assert np.array_equal(probs, torch.cat(expected).numpy())


def test_a_head_scores_memory_mapped_features_a_block_at_a_time(tmp_path):
    from imgcls.modeling.features import head_probabilities

    rng = np.random.default_rng(0)
    with NpyStream(tmp_path / "f.npy", (2500, 16), np.float32) as stream:
        stream.write(0, rng.normal(size=(2500, 16)))
        features = stream.publish()
    head = torch.nn.Linear(16, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns on a read-only whole array
        probs = head_probabilities(head, features)
    with torch.inference_mode():
        whole = torch.softmax(head(torch.from_numpy(np.array(features))), dim=1)
    assert probs.shape == (2500, 3)
    torch.testing.assert_close(probs, whole, rtol=0, atol=1e-6)

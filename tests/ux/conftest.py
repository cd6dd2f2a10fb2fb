"""Helpers of the user's-view tests: checking PNGs, reading TensorBoard event files back."""

import struct

import pytest


def _read_events(folder):
    """Every Event of every event file under `folder` (TFRecord framing: u64 length, u32 crc,
    payload, u32 crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


@pytest.fixture
def read_scalars():
    """`read_scalars(folder)` -> {(tag, step): value} of every scalar logged under `folder`."""
    return lambda folder: {(v.tag, e.step): v.simple_value for e in _read_events(folder)
                           for v in e.summary.value}


def _assert_png(path, min_side=100):
    """A file that decodes as a PNG of at least `min_side` pixels a side, not a blank canvas."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side, img.shape
    assert img.std() > 0


@pytest.fixture
def assert_png():
    return _assert_png

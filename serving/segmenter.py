"""Kept so that models logged before the pyfunc moved to `emunet.inference.segmenter` still load: their
pickles name `serving.segmenter.StackSegmenter`."""

from emunet.inference.segmenter import StackSegmenter  # noqa: F401

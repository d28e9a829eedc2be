"""
Progress bars (tqdm) that read well on a terminal and in a log file alike.
"""
import sys
import time

from tqdm import tqdm


class _LinesEvery:
    """A file for tqdm when stderr is not a terminal (a log file, a pipe): instead of a carriage-return
    redraw per step (hundreds of KB of them in a log), one plain line every `seconds`, and the final
    state when the bar closes."""

    def __init__(self, stream, seconds):
        self.stream, self.seconds = stream, seconds
        self.pending, self.last = "", 0.0

    def write(self, text):
        shown = text.replace("\r", "").replace("\x1b[A", "").strip()
        if shown:  # (tqdm also writes blanks to clear its line: nothing to show)
            self.pending = shown
        if self.pending and ("\n" in text or time.time() - self.last >= self.seconds):
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.last = "", time.time()

    def flush(self):
        self.stream.flush()


def progress_bar(iterable, desc, disable=False, seconds=10.0):
    """tqdm over iterable: a live bar on a terminal, a line every few seconds in a file."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=disable)
    return tqdm(iterable, desc=desc, file=_LinesEvery(sys.stderr, seconds), ncols=100, ascii=True)

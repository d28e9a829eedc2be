"""Progress bars: a live bar on a terminal; in a log file, plain lines a few seconds apart instead of
a carriage-return redraw per step."""
import io
import sys

from support import progress


def test_progress_in_a_file_is_a_few_plain_lines(monkeypatch):
    log = io.StringIO()  # not a terminal, like `python pretrain.py > run.log 2>&1`
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.progress_bar(range(2000), "pretrain")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # the scripts update the bar every step
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines   # the first state, maybe one more, and the final one
    assert "2000/2000" in lines[-1] and lines[-1].startswith("pretrain")


def test_progress_lines_follow_the_interval(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    clock = iter(range(0, 10_000, 3))  # every write happens 3 s after the one before
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    bar = progress.progress_bar(range(40), "finetune", seconds=10.0)
    for _ in bar:
        bar.refresh()
    bar.close()
    lines = log.getvalue().splitlines()
    assert 8 <= len(lines) <= 30 and all(line.startswith("finetune") for line in lines)

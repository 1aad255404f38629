"""The long jobs' progress bar: in place on a terminal, a few plain lines in a log, nothing when off."""

import io
import sys

from tdd_lightning.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_start_and_end_only(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(total=1000, desc="encode", unit="img") as bar:
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(skipped=0, refresh=False)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()  # the start and the end: no redraws
    assert lines[0].startswith("encode:   0%") and lines[1].startswith("encode: 100%")
    assert "1000/1000" in lines[1] and "skipped=0" in lines[1]


def test_iterating_and_disabled(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress_bar(range(5), desc="vae", enabled=False)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""
    assert sum(progress_bar(range(5), desc="vae")) == 10
    assert len(log.getvalue().splitlines()) == 2


def test_a_terminal_gets_the_bar_in_place(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    for _ in progress_bar(range(3), desc="sample", mininterval=0):
        pass
    out = term.getvalue()
    assert out.count("\r") >= 3 and out.endswith("\n") and "sample: 100%" in out

import io

from seekmoe.progress import LogProgress, show_progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_writes_a_line_every_twentieth_of_the_work_not_every_step():
    log = io.StringIO()
    bar = show_progress(1000, "train", "step", stream=log)
    assert isinstance(bar, LogProgress)
    for step in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in log.getvalue()
    assert lines[0].startswith("train 50/1000 (5%)") and lines[-1].startswith("train 1000/1000 (100%)")
    assert lines[-1].endswith("loss=0.001")


def test_progress_resumed_counts_from_its_start_and_closes_with_the_last_count():
    log = io.StringIO()
    bar = show_progress(100, "train", "step", initial=40, stream=log)
    for _ in range(7):
        bar.update(1)
    bar.close()
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("train 47/100 (47%)")
    assert len(log.getvalue().splitlines()) == 2  # crossing 45, then close at 47


def test_progress_on_a_terminal_is_a_bar_and_disabled_is_silent():
    tty, quiet = _Tty(), io.StringIO()
    bar = show_progress(10, "train", "step", stream=tty)
    assert not isinstance(bar, LogProgress)
    bar.update(10)
    bar.close()
    off = show_progress(10, "train", "step", enabled=False, stream=quiet)
    off.update(10)
    off.close()
    assert "\r" in tty.getvalue() and quiet.getvalue() == ""


def test_progress_of_bytes_in_a_log_reads_in_megabytes():
    log = io.StringIO()
    bar = show_progress(20_000_000, "tokenizing", "B", stream=log)
    bar.update(20_000_000)
    bar.close()
    line = log.getvalue().splitlines()[-1]
    assert line.startswith("tokenizing 20.0 MB/20.0 MB (100%)") and line.endswith("MB/s"), line

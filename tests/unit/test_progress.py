"""The one progress display (``anomalygen.progress``): what a row shows, when it leaves, where it writes."""

from __future__ import annotations

import io

from rich.console import Console

from anomalygen import progress


def log_console(log: io.StringIO) -> Console:
    return Console(file=log, force_terminal=False, width=200)


def test_bar_iter_yields_every_item_counts_it_under_its_description_and_leaves_no_row(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    with progress.display(log_console(log)) as shown:
        assert list(progress.bar_iter(iter("abc"), 3, "ddim sampling")) == ["a", "b", "c"]
        assert shown.tasks == []  # a sampling loop's row goes when it ends
    lines = [line.split(",")[0] for line in log.getvalue().splitlines() if " elapsed, " in line]
    assert lines == ["ddim sampling: 1/3", "ddim sampling: 2/3", "ddim sampling: 3/3"]


def test_a_bar_stays_in_the_display_when_closed_unless_told_not_to():
    with progress.display(log_console(io.StringIO())) as shown:
        kept, gone = progress.Bar(2, "fit"), progress.Bar(2, "sampling", leave=False)
        kept.close()
        gone.close()
        assert [task.description for task in shown.tasks] == ["fit"]


def test_a_bar_on_its_own_writes_its_last_state_to_stderr_when_it_ends(capsys):
    bar = progress.Bar(2, "fitting the tokens")
    bar.update(2)
    bar.close()
    captured = capsys.readouterr()
    assert "fitting the tokens" in captured.err and "2/2" in captured.err and captured.out == ""
    assert not progress._active


def test_the_display_leaves_each_row_with_its_count_and_postfix_in_a_log_when_it_closes():
    log = io.StringIO()
    with progress.display(log_console(log)):
        bar = progress.Bar(2, "fit")
        bar.update()  # one step by default
        bar.set_postfix(loss="0.5")
        bar.update()
        bar.close()
    (row,) = [line for line in log.getvalue().splitlines() if line.startswith("fit")]
    assert "2/2" in row and row.rstrip().endswith("loss=0.5")


def test_a_disabled_bar_takes_every_call_and_shows_nothing(capsys):
    bar = progress.Bar(3, "other process", disable=True)
    bar.update()
    bar.set_postfix(loss=1)
    bar.close()
    assert capsys.readouterr().err == "" and not progress._active


def test_a_log_line_counts_from_the_bars_own_start_in_hours_and_shows_its_words_as_written(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    with progress.display(log_console(log)):
        bar = progress.Bar(10, "DRAEM [generated]")
        clock[0] += 3725.0  # 1 h 2 min 5 s for the first step: 9 such steps left
        bar.set_postfix(loss="[0.5]")
        bar.update(1)
        clock[0] += 3475.0  # 2 h for two steps
        bar.update(1)
        bar.close()
    lines = [line for line in log.getvalue().splitlines() if " elapsed, " in line]
    assert lines == ["DRAEM [generated]: 1/10, 1:02:05 elapsed, ~9:18:45 left loss=[0.5]",
                     "DRAEM [generated]: 2/10, 2:00:00 elapsed, ~8:00:00 left loss=[0.5]"]


def test_a_display_opened_inside_another_adds_its_rows_to_it():
    with progress.display(log_console(io.StringIO())) as outer:
        with progress.display() as inner:
            assert inner is outer
            progress.Bar(1, "inner row")
        assert [task.description for task in outer.tasks] == ["inner row"]
    assert not progress._active


def test_a_spent_time_budget_shows_the_steps_done_as_the_whole(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with progress.display(log_console(io.StringIO())):
        bar = progress.Bar(1000, "fit", time_budget_s=10.0)
        clock[0] = 4.0
        bar.update(1)
        assert bar._shown_total() == 1 + 2  # 1 step in 4 s: 6 s left allow 1.5, rounded up
        clock[0] = 20.0
        bar.update(1)
        assert bar._shown_total() == 2  # past the budget: no step more
        bar.close()

"""What a launch tells its user: progress lines when not on a terminal, advice phrased for the next search."""
from master.borders import BorderFlag
from master.config import Distribution
from master.launcher import Reporter
from master.stages import flag_messages


class Collect(Reporter):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def test_progress_is_a_line_per_change():
    reporter = Collect()
    with reporter.following("exp/coarse", 4) as update:
        for state in ((0, 0, "best so far: -"), (0, 0, "best so far: -"), (0, 2, "best so far: -"),
                      (1, 2, "best so far: coarse-0001 val 0.9000"), (1, 2, "best so far: coarse-0001 val 0.9000")):
            update(*state)
    assert reporter.lines == ["exp/coarse: 0/4 finished, 0 running; best so far: -",
                              "exp/coarse: 0/4 finished, 2 running; best so far: -",
                              "exp/coarse: 1/4 finished, 2 running; best so far: coarse-0001 val 0.9000"]


def test_widen_advice_after_the_last_stage_is_for_the_next_search():
    space = (Distribution("solver.lr", "loguniform", 1e-4, 1e-1),)
    flag = BorderFlag("solver.lr", "upper", 0.09, 1e-4, 1e-1, 1e-3, 0.4)
    (during,) = flag_messages([flag], space)
    (after,) = flag_messages([flag], space, last=True)
    assert during.endswith("-> widen to [1e-03, 4e-01]")
    assert after.endswith("-> for your next search, widen to [1e-03, 4e-01]")

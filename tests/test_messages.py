"""What a launch tells its user: progress lines when not on a terminal, advice phrased for the next search."""
from master.borders import BorderFlag
from master.config import Distribution
from master.launcher import Reporter
from master.monitor import Event
from master.stages import StagePlan
from master.stages import flag_messages


class Collect(Reporter):
    def __init__(self):
        super().__init__()
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


def test_a_border_flag_told_when_its_stage_closed_is_not_told_again_by_the_next_plan():
    space = (Distribution("solver.lr", "loguniform", 1e-4, 1e-1),)
    flag = BorderFlag("solver.lr", "upper", 0.09, 1e-4, 1e-1, 1e-3, 0.4)
    (message,) = flag_messages([flag], space)
    narrowed = (Distribution("solver.lr", "loguniform", 1e-3, 0.4),)
    plan = StagePlan(None, (), narrowed, "coarse", tuple(zip(space, narrowed)), (flag,), "ranges from the best 3")
    alone = Collect()
    alone.plan(plan)  # `master launch --stage medium` on its own: the previous stage's flag is news
    assert alone.lines[0] == f"border: {message}"
    following = Collect()  # `--all`: the flag was told when coarse closed
    following.events([Event("stage", "stage coarse completed: 3 COMPLETED"), Event("flag", message)])
    following.plan(plan)
    assert following.lines.count(message) == 1 and not any(line.startswith("border:") for line in following.lines)
    assert "ranges from the best 3" in following.lines

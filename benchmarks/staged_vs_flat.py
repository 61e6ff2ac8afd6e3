"""Epochs that flat random search and our coarse-to-fine search spend to reach flat search's best val accuracy.

Usage: python benchmarks/staged_vs_flat.py [--tasks digits,spiral6] [--seeds 0,1,2,3,4] [--trials 32]
       [--space wide|default] [--plan NAME] [--draws paired|independent] [--flat-cache DIR] [--markdown]
       [--plot FILE.png] [--ladders]

Tasks: digits (MLP on the 8x8 digits, 270 validation samples) and spiral6, the harder one: an MLP on cs231n's
spiral grown to 6 arms x 1000 points (nncore.data.make_spiral), 1800 validation samples, still improving after 30
epochs. Its validation set is large enough that "within 0.5 points" is 9 samples; the small built-ins spiral (90
validation samples) and waves (conv1d, 300), also selectable, make the target "equal to flat search's luckiest
epoch". noisywaves, a conv1d task, is waves' generator at 4 x 750 with extra Gaussian noise (1800 validation samples
at ~0.7 accuracy: one validation measurement's noise is ~1 point). Flat search trains N trials (default 32) at the
full budget (30 epochs). --space wide (the default) samples lr in [1e-6, 1] and L2 in [1e-6, 10], log-uniformly,
the way cs231n starts a coarse search; --space default uses the product's default ranges (lr [1e-4, 1e-1], L2
[1e-6, 1e-1]), already close to the good region. Both also sample dropout and hidden sizes.
Staged search, --plan default: the product's default plan, master.config.DEFAULT_STAGES (at N = 32: coarse
32 x 1 epoch; short, the best half of those that completed continued to 2 epochs, at most 14; medium, the best
4/5 of those to 10, at most 12; fine, the best half of those to 30, at most 5; no pruning), its caps scaled by
N / 32; the other plans of PLANS are the variants measured against it (--plan screen2: the default of session 5,
two screens with narrowing; --plan classic: the default until session 5, 32 x 1, 16 x 5 narrowed, best 4 to 30).
Draws (--draws): "paired" (default) names flat search's stage as the plans' first, so flat search trains the
very 32 configurations (values and training seeds) that the staged search screens: both ways of spending epochs
are judged on the same luck of the draw, and "reaches flat's best" means the plan kept (or beat) flat's winner;
"independent" gives flat search its own draws, as before session 6. All run one trial
at a time in this process with the project's own code (master.stages plans every stage, master.pruning's rules stop
trials at the end of an epoch, the worker's run_trial trains and checkpoints), so the epoch counts are
those a cluster would spend; the rungs see the trials that finished before, as on one worker. An epoch
counts when it is trained: a promoted trial's inherited epochs are not counted again. "Epochs to target"
is the cumulative number of epochs, in execution order, until some trial's validation accuracy first
reaches the flat search's best minus 0.5 points (inf when it never does); "(any order)" averages flat
search's count over every order of its independent trials, removing the luck of which trial happened to
run first. The last two columns replay successive halving on flat search's own trials (a continued trial
repeats its curve, as promote resumes bit for bit): every trial screened for one epoch, then continued best
first by that epoch's accuracy ("ranked"), or only the one that gets to the target soonest ("perfect pick":
the fewest epochs any choice made from a one-epoch screen of those trials can spend). They tell how much of
a miss is the one-epoch ranking and how much the task allows at all; --ladders also replays the successive
halving ladders of LADDERS (several rungs after the screen) and counts the runs each meets the target in.
--plot draws, per task, how far each search's best validation accuracy so far is below flat search's best
against the epochs spent (median over the seeds and the quartiles; flat search averaged over the orders of
its trials). --flat-cache DIR keeps flat search's curves per task and seed (cached_search), so a plan costs only
its own run. Counts are deterministic for a seed; wall time depends on machine load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import master.pruning
import nncore
import worker
from master.monitor import close_stage
from master.sampler import sample_trials
from nncore.data import make_spiral, make_waves
from master.pruning import Rule, TrialView, should_kill
from master.budget import scale
from master.config import DEFAULT_STAGES, ExperimentConfig, StageConfig, parse_config
from master.stages import StagePlan, plan_stage, previous_stage
from worker.control import stop_request
from worker.records import StageRecord
from worker.states import StageStatus
from worker.store import ExperimentStore, atomic_write_json, read_json
from worker.trainer import run_trial

EPOCHS = 30
TOLERANCE = 0.005  # "within 0.5 points" of flat search's best validation accuracy
TARGET_RATIO = 5.0

SPACE = """
[space.solver]
lr = {{ dist = "loguniform", low = {lr_low}, high = {lr_high} }}
reg = {{ dist = "loguniform", low = 1e-6, high = {reg_high} }}
[space.model]
dropout = {{ dist = "uniform", low = 0.0, high = 0.5 }}
hidden = {{ dist = "choice", values = [[64], [128], [256, 128]] }}
"""
SPACES = {  # --space: the product default's ranges, or cs231n's coarse first search (a wide log scale)
    "default": SPACE.format(lr_low="1e-4", lr_high="1e-1", reg_high="1e-1"),
    "wide": SPACE.format(lr_low="1e-6", lr_high="1e0", reg_high="1e1"),
}
TASKS = {  # dataset -> fixed settings; the harder tasks need many epochs and their 1-epoch ranking is noisier
    "spiral6": '[experiment]\nname = "{name}"\ndataset = "npz:{data}/spiral6.npz"\nseed = {seed}\n'
               '[data]\npreprocess = "standardize"\nval_fraction = 0.3\n[solver]\nupdate = "adam"\nbatch_size = 32\n',
    "digits": '[experiment]\nname = "{name}"\ndataset = "digits"\nseed = {seed}\n'
              '[data]\npreprocess = "standardize"\n[solver]\nupdate = "adam"\nbatch_size = 64\n',
    "waves": '[experiment]\nname = "{name}"\ndataset = "waves"\nseed = {seed}\n'
             '[data]\npreprocess = "standardize"\nval_fraction = 0.3\n[model]\narch = "conv1d"\nconv_channels = [16]\n'
             '[solver]\nupdate = "adam"\nbatch_size = 32\n',
    "noisywaves": '[experiment]\nname = "{name}"\ndataset = "npz:{data}/noisywaves.npz"\nseed = {seed}\n'
                  '[data]\npreprocess = "standardize"\nval_fraction = 0.6\n[model]\narch = "conv1d"\n'
                  'conv_channels = [16]\n[solver]\nupdate = "adam"\nbatch_size = 32\n',
    "spiral": '[experiment]\nname = "{name}"\ndataset = "spiral"\nseed = {seed}\n'
              '[data]\npreprocess = "standardize"\nval_fraction = 0.3\n[solver]\nupdate = "adam"\nbatch_size = 16\n',
}


def noisy_waves(per_class: int = 750, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """The built-in waves' generator, 4 x ``per_class`` sequences, with Gaussian noise of std ``noise`` added
    (fixed seed): a conv1d task still improving after 30 epochs, as spiral6 is for an MLP (good networks reach
    0.65-0.75 at 30 epochs)."""
    x, y = make_waves(per_class=per_class)
    return x + noise * np.random.default_rng(1).standard_normal(x.shape), y


GENERATED = {  # task -> its data, written to DIR/<task>.npz: spiral6 is 6 spiral arms x 1000 points (1800 val),
    # noisywaves 4 x 750 noisy sequences for conv1d (1800 val)
    "spiral6": lambda: make_spiral(per_class=1000, classes=6),
    "noisywaves": noisy_waves,
}


DRAWS = ("paired", "independent")  # --draws: flat search's stage is named as the plans' first stage, or not


def flat_stages(n: int, draws: str = "paired") -> str:
    """Flat search as one stage of n trials x 30 epochs. A trial's values and training seed depend on the
    experiment's seed, its stage's name and its index (master.sampler.trial_rng): "paired" names the stage
    "coarse", as every plan's first stage, so flat search trains the very configurations the staged search
    screens (common random numbers: the comparison is of the two ways to spend epochs on the same draws);
    "independent" names it "flat", so the two searches draw different configurations."""
    name = "coarse" if draws == "paired" else "flat"
    return f'[stages.{name}]\nepochs = {EPOCHS}\ntrials = {n}\nprune = "none"\n'


def screen2_stages(n: int, screen: float = 1.0, promote: float = 3 / 16, horizon: int = 4, second: float = 3 / 8,
                   final: float = 1 / 8, pool: str = "all") -> str:
    """Two screens, every cost fixed: screen*n random trials x 1 epoch, the best promote*n continued to ``horizon``
    epochs, second*n fresh trials x ``horizon`` epochs in ranges narrowed around the best of the whole first
    screen at the longest horizon each reached, the best final*n of both screens' trials at ``horizon`` epochs
    (``pool``; "previous": of the second screen only) continued to 30 (no pruning: a slow starter is judged at
    ``horizon`` epochs, never at one)."""
    return (f'[stages.coarse]\nepochs = 1\ntrials = {round(screen * n)}\n'
            f'[stages.medium]\nepochs = {horizon}\ntrials = {round(promote * n)}\nmethod = "promote"\nprune = "none"\n'
            f'[stages.second]\nepochs = {horizon}\ntrials = {round(second * n)}\nmethod = "narrow"\nprune = "none"\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = {round(final * n)}\nmethod = "promote"\nprune = "none"\n'
            f'pool = "{pool}"\n')


def halving_stages(n: int) -> str:
    """Successive halving in two stages, best first: 3n/8 random trials x 3 epochs (ASHA's rung at epoch 1
    stops those that start badly), then the best 3 continued to the full budget (ASHA rungs at 9 and 27)."""
    coarse = max(3 * n // 8, 1)
    return (f'[stages.coarse]\nepochs = 3\ntrials = {coarse}\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = {min(3, coarse)}\nmethod = "promote"\n')


def classic_stages(n: int) -> str:
    """The product's default plan until session 5 (the issue's "default plan"): n x 1 epoch, n/2 x 5 epochs
    narrowed, the best 4 continued to the full budget."""
    medium = max(n // 2, 1)
    return (f'[stages.coarse]\nepochs = 1\ntrials = {n}\n'
            f'[stages.medium]\nepochs = 5\ntrials = {medium}\nmethod = "narrow"\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = {min(4, medium)}\nmethod = "promote"\n')


def stages_toml(stages: tuple[StageConfig, ...]) -> str:
    """``stages`` as the [stages.<name>] tables of a config."""
    return "".join(f"[stages.{s.name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.to_dict().items())
                   for s in stages)


def default_stages(n: int) -> str:
    """The product's default plan, master.config.DEFAULT_STAGES, its trial counts scaled by n / 32 (as --budget
    scales them)."""
    return stages_toml(scale(DEFAULT_STAGES, max(1, round(DEFAULT_STAGES[0].trials * n / 32))))


def late_stages(n: int, screen: float = 1.5, promote: float = 3 / 8, horizon: int = 5, fine: float = 3 / 8,
                rung: int = 5, prune: str = "asha") -> str:
    """Narrowing decided at a longer horizon: screen*n random trials x 1 epoch, the best promote*n continued to
    ``horizon`` epochs, then fine*n fresh trials x 30 epochs in ranges narrowed around the best of the whole
    screen judged at the longest horizon each reached (``prune`` from epoch ``rung``)."""
    return (f'[stages.coarse]\nepochs = 1\ntrials = {round(screen * n)}\n'
            f'[stages.medium]\nepochs = {horizon}\ntrials = {round(promote * n)}\nmethod = "promote"\nprune = "none"\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = {round(fine * n)}\nmethod = "narrow"\nprune = "{prune}"\n'
            f'rung = {rung}\n')


def hedged_stages(n: int) -> str:
    """The classic plan with half of the fine stage's promotions kept for learning-rate and model-size bins."""
    return classic_stages(n) + "hedge = 0.5\n"


def wide_stages(n: int) -> str:
    """The classic plan promoting 8 instead of 4, half of them for bins (more hedging for more epochs)."""
    return classic_stages(n).replace(f"trials = {min(4, max(n // 2, 1))}\nmethod", "trials = 8\nmethod") + \
        "hedge = 0.5\n"


def screen3_stages(n: int) -> str:
    """A longer screen: n/2 x 3 epochs, n/4 x 8 narrowed (rungs from 3), the best 4 (2 hedged) to 30."""
    return (f'[stages.coarse]\nepochs = 3\ntrials = {n // 2}\nprune = "none"\n'
            f'[stages.medium]\nepochs = 8\ntrials = {n // 4}\nmethod = "narrow"\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = 4\nmethod = "promote"\nhedge = 0.5\n')


def halving12_hedged_stages(n: int) -> str:
    """No narrowing: n x 1 epoch, the best 12 (6 hedged) continued to 5, the best 4 (2 hedged) to 30."""
    return (f'[stages.coarse]\nepochs = 1\ntrials = {n}\n'
            f'[stages.medium]\nepochs = 5\ntrials = 12\nmethod = "promote"\nhedge = 0.5\n'
            f'[stages.fine]\nepochs = {EPOCHS}\ntrials = 4\nmethod = "promote"\nhedge = 0.5\n')


def halving12_stages(n: int) -> str:
    """The same without hedging: the best 12 by one-epoch accuracy to 5, the best 4 to 30."""
    return halving12_hedged_stages(n).replace("hedge = 0.5\n", "")


HALVING_Q = ((1 / 2, 12, 2), (2 / 3, 8, 8), (1 / 2, 4, 30))  # (share, at most, epochs) per rung


def halving_q_stages(n: int, rungs: tuple[tuple[float, int, int], ...] = HALVING_Q,
                     narrow: tuple[int, int] | None = None) -> str:
    """Successive halving by shares of the trials that completed: n random trials x 1 epoch, then per rung
    (share, at most, epochs) the best share of the completed trials (at most ``at most`` x n / 32) continued to
    the rung's epochs, so trials that diverged shrink every later rung; ``narrow`` (trials, after rung i): that
    many fresh trials x the rung's epochs in ranges narrowed around the whole screen at its longest horizon,
    after rung i, competing with its trials for the next promotion (pool "all")."""
    text = f'[stages.coarse]\nepochs = 1\ntrials = {n}\n'
    for i, (share, most, epochs) in enumerate(rungs):
        name = "fine" if i == len(rungs) - 1 else ("medium", "third", "fourth")[i]
        text += (f'[stages.{name}]\nepochs = {epochs}\ntrials = {max(1, round(most * n / 32))}\nmethod = "promote"\n'
                 f'prune = "none"\nquantile = {share}\n' + ('pool = "all"\n' if narrow and i == narrow[1] + 1 else ""))
        if narrow and i == narrow[1]:
            text += (f'[stages.second]\nepochs = {epochs}\ntrials = {max(1, round(narrow[0] * n / 32))}\n'
                     f'method = "narrow"\nprune = "none"\n')
    return text


PLANS = {  # --plan: the product's default, and the variants measured against it (benchmarks/RESULTS.md)
    "default": default_stages,
    "default-q1of4": partial(halving_q_stages, rungs=((1 / 4, 8, 2), (4 / 5, 8, 10), (1 / 2, 5, 30))),
    "classic": classic_stages,
    "screen2": screen2_stages,
    "screen2-previous": partial(screen2_stages, pool="previous"),
    "screen2-final5": partial(screen2_stages, final=5 / 32),
    "halving": halving_stages,
    "late": late_stages,
    "hedged": hedged_stages,
    "hedged8": wide_stages,
    "screen3": screen3_stages,
    "halving12": halving12_stages,
    "halving12-hedged": halving12_hedged_stages,
    "halving-q": halving_q_stages,
    "halving-q-narrow8": partial(halving_q_stages, rungs=((1 / 2, 12, 2), (2 / 3, 6, 8), (1 / 2, 4, 30)),
                                 narrow=(6, 1)),
    "halving-q-narrow6": partial(halving_q_stages, rungs=((3 / 8, 8, 3), (1 / 2, 8, 8), (1 / 2, 4, 30)),
                                 narrow=(6, 0)),
}


class RuleControl:
    """The monitor's stopping rule applied in-process at the end of every epoch (peers: earlier trials)."""

    def __init__(self, store: ExperimentStore, trial_id: str, peers: list[str], rule: Rule):
        self.store, self.trial_id, self.peers, self.rule = store, trial_id, peers, rule
        self.reason: str | None = None

    def should_stop(self) -> str | None:
        return self.reason

    def confirm(self) -> None:
        """In-process: the trial is always ours."""

    def report(self, fields: dict) -> None:
        if self.reason is not None or "last_loss" not in fields:
            return
        now = time.time()
        trial = TrialView.from_history(self.trial_id, self.store.read_history(self.trial_id),
                                       {**fields, "updated": now})
        peers = [TrialView.from_history(p, self.store.read_history(p)) for p in self.peers]
        verdict = should_kill(trial, peers, self.rule, now)
        if verdict is not None:
            self.reason = stop_request(verdict.reason, verdict.state)


def begin_stage(store: ExperimentStore, config: ExperimentConfig, stage: StageConfig
                ) -> tuple[StagePlan, list[str], int, Rule]:
    """Plan ``stage`` with the product's planner and record it as launched; its trial ids, the epochs its trials
    bring along (promote) and its stopping rule (first rung not before the screen, as master.monitor does)."""
    plan = plan_stage(store, config, stage.name)
    ids = [s.trial_id for s in plan.specs]
    store.write_stage(StageRecord(stage.name, stage.method, stage.epochs, 0, tuple(ids), StageStatus.LAUNCHED,
                                  ranges={d.name: d.to_dict() for d in plan.space}))
    before = previous_stage(config, stage.name)
    start = before.epochs if stage.method == "promote" and before else 0
    return plan, ids, start, Rule.of(stage, config.watch, start, config.stages[0].epochs if before else 0)


def run_search(config: ExperimentConfig, root: Path) -> tuple[list[list[float]], dict[str, int]]:
    """Run every stage of ``config``; returns each trial's validation accuracy per epoch it trained, in
    execution order, and the number of trials per end state."""
    store = ExperimentStore(root, config.name).ensure()
    trials: list[list[float]] = []
    states: dict[str, int] = {}
    for stage in config.stages:
        plan, ids, start, rule = begin_stage(store, config, stage)
        for i, spec in enumerate(plan.specs):
            store.write_spec(spec.to_dict())
            result = run_trial(spec, store, RuleControl(store, spec.trial_id, ids[:i], rule))
            states[result.state.value] = states.get(result.state.value, 0) + 1
            trials.append([r["val_acc"] for r in store.read_history(spec.trial_id) if r["epoch"] > start])
        for event in close_stage(store, config, stage.name, "")[1:]:
            print(f"    {stage.name} flag: {event.message}", file=sys.stderr)
    return trials, states


def sources_hash() -> str:
    """A hash of the code that trains and stops flat search's trials: nncore, worker and master.pruning's rules."""
    files = sorted([*Path(nncore.__file__).parent.glob("*.py"), *Path(worker.__file__).parent.glob("*.py"),
                    Path(master.pruning.__file__)])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cached_search(config: ExperimentConfig, root: Path, cache: Path | None
                  ) -> tuple[list[list[float]], dict[str, int], float]:
    """``run_search``'s curves and end states and its wall seconds, read from ``cache`` (a directory) when a run
    with the same key is there, else run and written there. The key hashes every trial's spec (the data path
    made relative to ``root``), every stage's settings, the watch settings and the training code's sources
    (``sources_hash``), so a change to any of them misses (a stage's ``pool``, added later, only when not the
    default, which a random stage ignores: older caches stay valid); the cached seconds are those of the run that
    filled it."""
    if cache is None:
        started = time.perf_counter()
        trials, states = run_search(config, root)
        return trials, states, time.perf_counter() - started
    specs = [s.to_dict() for stage in config.stages for s in sample_trials(config, stage.name, stage.trials)]
    stages = [{k: v for k, v in s.to_dict().items() if (k, v) != ("pool", "previous")} for s in config.stages]
    text = json.dumps({"specs": specs, "stages": stages, "watch": config.watch.to_dict(),
                       "sources": sources_hash()}, sort_keys=True).replace(str(root), "<data>")
    path = cache / f"{config.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if (hit := read_json(path)) is not None:
        return hit["trials"], hit["states"], hit["seconds"]
    started = time.perf_counter()
    trials, states = run_search(config, root)
    seconds = time.perf_counter() - started
    atomic_write_json(path, {"trials": trials, "states": states, "seconds": seconds})
    return trials, states, seconds


def first_hit(accs: list[float], target: float) -> int:
    """The 1-based epoch at which ``accs`` first reaches ``target``; 0 when it never does."""
    return next((e for e, acc in enumerate(accs, 1) if acc >= target - 1e-12), 0)


def epochs_to(trials: list[list[float]], target: float) -> float:
    """Epochs spent, in execution order, until some trial first reaches ``target`` (inf if none does)."""
    spent = 0
    for accs in trials:
        hit = first_hit(accs, target)
        if hit:
            return spent + hit
        spent += len(accs)
    return math.inf


def expected_epochs_to(trials: list[list[float]], target: float, draws: int = 5000) -> float:
    """``epochs_to`` averaged over random orders of the trials: flat search's trials are independent, so
    every order was as likely as the one that ran (removes the luck of the draw from its count)."""
    if not any(first_hit(accs, target) for accs in trials):
        return math.inf
    rng = np.random.default_rng(0)
    return statistics.fmean(epochs_to([trials[i] for i in rng.permutation(len(trials))], target)
                            for _ in range(draws))


ALL = None  # a rung that keeps every trial
LADDERS = {  # --ladders: after the one-epoch screen, (trials kept, epochs trained to) per rung, best first
    "continue all to 30": ((ALL, EPOCHS),),
    "best 4 -> 30": ((4, EPOCHS),),
    "best 8 -> 3, best 3 -> 30": ((8, 3), (3, EPOCHS)),
    "best 6 -> 3, best 2 -> 10, best 1 -> 30": ((6, 3), (2, 10), (1, EPOCHS)),
    "best 8 -> 2, best 4 -> 5, best 1 -> 30": ((8, 2), (4, 5), (1, EPOCHS)),
    "best 10 -> 2, best 3 -> 30": ((10, 2), (3, EPOCHS)),
    "best 8 -> 5, best 2 -> 30": ((8, 5), (2, EPOCHS)),
}


def replay(trials: list[list[float]], target: float, ladder: tuple[tuple[int | None, int], ...] = ((ALL, EPOCHS),),
           perfect: bool = False) -> float:
    """Successive halving replayed on flat search's own trials, whose curves are what a continued trial gives
    (promote resumes bit for bit): each trains one epoch, then at every rung of ``ladder`` the best ``n`` by
    validation accuracy so far continue, best first, to the rung's epoch, until one reaches ``target``; the
    default continues them all to the full budget. ``perfect``: only the trial that gets there soonest
    continues, the fewest epochs any choice made from a one-epoch screen of these trials can spend."""
    screen = [accs[:1] for accs in trials]
    if any(first_hit(accs, target) for accs in screen):
        return epochs_to(screen, target)
    spent, done = sum(map(len, screen)), 1
    if perfect:
        return spent + min((first_hit(accs, target) - 1 for accs in trials if first_hit(accs, target)),
                           default=math.inf)
    pool = trials
    for keep, epochs in ladder:
        pool = sorted(pool, key=lambda accs: -max(accs[:done], default=0.0))[:keep]
        rung = [accs[done:epochs] for accs in pool]
        if math.isfinite(hit := epochs_to(rung, target)):
            return spent + hit
        spent, done = spent + sum(map(len, rung)), epochs
    return math.inf


def anytime(trials: list[list[float]]) -> np.ndarray:
    """Best validation accuracy so far after each epoch spent, in execution order."""
    return np.maximum.accumulate(np.concatenate([np.asarray(a, dtype=float) for a in trials if a] or [[0.0]]))


def gap_curve(trials: list[list[float]], reference: float, epochs: int, orders: int = 0) -> np.ndarray:
    """Points below ``reference`` after 1..``epochs`` epochs (the last value held once the search ended);
    with ``orders``, averaged over that many random orders of the trials."""
    def gaps(curve: np.ndarray) -> np.ndarray:
        held = np.concatenate([curve, np.full(max(epochs - len(curve), 0), curve[-1])])[:epochs]
        return 100 * (held - reference)
    if not orders:
        return gaps(anytime(trials))
    rng = np.random.default_rng(0)
    return np.mean([gaps(anytime([trials[i] for i in rng.permutation(len(trials))])) for _ in range(orders)], axis=0)


def plot(curves: dict[str, dict[str, list[np.ndarray]]], path: Path, title: str) -> None:
    """One panel per task: median and interquartile band over seeds of each search's gap curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(curves), 4.2), layout="constrained")
    for ax, (task, kinds) in zip(np.atleast_1d(fig.subplots(1, len(curves))), curves.items()):
        for kind, runs in kinds.items():
            x = np.arange(1, len(runs[0]) + 1)
            q25, q50, q75 = np.percentile(np.stack(runs), [25, 50, 75], axis=0)
            line, = ax.plot(x, q50, label=f"{kind} (median of {len(runs)} seeds)")
            ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.2)
        ax.axhline(-100 * TOLERANCE, color="k", ls="--", lw=1, label="target: flat best - 0.5 points")
        ax.set(xscale="log", xlabel="epochs spent", ylabel="best val acc so far - flat best (points)",
               title=task, ylim=(-20, 3))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def best(trials: list[list[float]]) -> float:
    return max(max(accs, default=0.0) for accs in trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,spiral6", help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated experiment seeds (split, sampling)")
    parser.add_argument("--trials", type=int, default=32, help="N: flat search's trials (the plans scale with it)")
    parser.add_argument("--plan", choices=sorted(PLANS), default="default",
                        help="the staged search's plan: the product's default coarse-to-fine (default) or halving")
    parser.add_argument("--space", choices=sorted(SPACES), default="wide",
                        help="the search space: cs231n's wide coarse ranges (default) or the product default's ranges")
    parser.add_argument("--draws", choices=DRAWS, default="paired",
                        help="paired (default): flat search trains the configurations the staged search screens "
                             "first (same values, same training seeds); independent: it draws its own")
    parser.add_argument("--flat-cache", type=Path, metavar="DIR",
                        help="read flat search's curves from DIR when there, else run it and write them there "
                             "(keyed by its trials' specs, stages and the training code; see cached_search)")
    parser.add_argument("--markdown", action="store_true", help="print the results as a Markdown table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw each search's best accuracy so far against the epochs spent")
    parser.add_argument("--ladders", action="store_true",
                        help="also replay the successive halving ladders of LADDERS on flat search's trials")
    args = parser.parse_args()
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    if args.flat_cache:
        args.flat_cache.mkdir(parents=True, exist_ok=True)
    if args.plot and not args.plot.parent.is_dir():
        parser.error(f"--plot: directory {args.plot.parent} does not exist")
    threadpool_limits(1)
    blas = next((f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
                 if i["user_api"] == "blas"), "unknown BLAS")
    rows = []
    curves: dict[str, dict[str, list[np.ndarray]]] = {}
    flats: dict[str, list[tuple[list[list[float]], float, float]]] = {}  # task -> (trials, target, any order)
    with tempfile.TemporaryDirectory(prefix="hs-staged-") as tmp:
        for task in args.tasks.split(","):
            if task in GENERATED:
                x, y = GENERATED[task]()
                np.savez(Path(tmp) / f"{task}.npz", x=x, y=y)
            for seed in (int(s) for s in args.seeds.split(",")):
                out = {}
                for kind, stages in (("flat", partial(flat_stages, draws=args.draws)), ("staged", PLANS[args.plan])):
                    name = f"{task}-{kind}-{seed}"
                    toml = TASKS[task].format(name=name, seed=seed, data=tmp) + stages(args.trials)
                    config = parse_config(toml + SPACES[args.space])
                    out[kind] = trials, states, _ = cached_search(config, Path(tmp),
                                                                  args.flat_cache if kind == "flat" else None)
                    print(f"  {name}: {sum(map(len, trials))} epochs, best {best(trials):.4f}, {states}, "
                          f"{out[kind][2]:.0f} s", file=sys.stderr)
                (flat, _, flat_s), (staged, _, staged_s) = out["flat"], out["staged"]
                target = best(flat) - TOLERANCE
                any_order = expected_epochs_to(flat, target)
                flats.setdefault(task, []).append((flat, target, any_order))
                if args.plot:
                    horizon = sum(map(len, flat))
                    panel = curves.setdefault(task, {"flat search": [], f"staged ({args.plan} plan)": []})
                    panel["flat search"].append(gap_curve(flat, best(flat), horizon, orders=200))
                    panel[f"staged ({args.plan} plan)"].append(gap_curve(staged, best(flat), horizon))
                rows.append((task, seed, best(flat), best(staged), epochs_to(flat, target),
                             any_order, epochs_to(staged, target),
                             sum(map(len, flat)), sum(map(len, staged)), flat_s, staged_s,
                             replay(flat, target), replay(flat, target, perfect=True)))
    header = ("task", "seed", "flat best", "staged best", "flat epochs to target", "(any order)",
              "staged epochs to target", "ratio", "(any order)", "flat total", "staged total", "flat s", "staged s",
              "replay: ranked", "replay: perfect pick")
    lines = [header]
    for task, seed, fbest, sbest, fn, fe, sn, ftot, stot, fs, ss, ranked, perfect in rows:
        lines.append((task, str(seed), f"{fbest:.4f}", f"{sbest:.4f}", str(fn), f"{fe:.0f}", str(sn),
                      f"{fn / sn:.1f}x", f"{fe / sn:.1f}x", str(ftot), str(stot), f"{fs:.0f}", f"{ss:.0f}",
                      f"{ranked} ({fe / ranked:.1f}x)", f"{perfect} ({fe / perfect:.1f}x)"))
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(line) + " |" for line in lines[1:]))
    else:
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print("\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines))
    for task in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == task]
        reached = sum(math.isfinite(r[6]) for r in mine)
        met = [sum(r[col] / r[6] >= TARGET_RATIO for r in mine) for col in (4, 5)]
        print(f"{task}: staged reached the target in {reached} of {len(mine)} runs, >= {TARGET_RATIO:.0f}x fewer "
              f"epochs than flat in {met[0]} (flat in its own order) / {met[1]} (any order); median ratio "
              f"{statistics.median(r[4] / r[6] for r in mine):.1f}x / "
              f"{statistics.median(r[5] / r[6] for r in mine):.1f}x")
        replayed = [sum(r[5] / r[col] >= TARGET_RATIO for r in mine) for col in (11, 12)]
        print(f"{task}: flat's own trials replayed with a one-epoch screen meet {TARGET_RATIO:.0f}x (any order) in "
              f"{replayed[0]} of {len(mine)} runs continued best first, {replayed[1]} with a perfect pick")
    if args.ladders:
        print("\nladders replayed on flat search's own trials after a one-epoch screen: runs reaching the target "
              f"/ runs >= {TARGET_RATIO:.0f}x (any order)")
        for task, runs in flats.items():
            for name, ladder in {**LADDERS, "perfect pick": None}.items():
                spent = [replay(t, target, ladder, perfect=True) if ladder is None else replay(t, target, ladder)
                         for t, target, _ in runs]
                met = sum(fe / e >= TARGET_RATIO for (_, _, fe), e in zip(runs, spent))
                print(f"  {task:8s} {name:42s} {sum(map(math.isfinite, spent)):2d} / {met:2d} of {len(runs)}")
    footer = (f"plan {args.plan}, space {args.space}, {args.trials} flat trials, {args.draws} draws; "
              f"BLAS: {blas}, 1 thread; python {sys.version.split()[0]}")
    print(footer)
    if args.plot:
        for panel in curves.values():  # flat searches of different seeds spend different totals: cut to the least
            for kind, runs in panel.items():
                panel[kind] = [r[:min(map(len, runs))] for r in runs]
        plot(curves, args.plot, footer)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

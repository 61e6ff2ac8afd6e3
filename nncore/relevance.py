"""Which model and solver fields a configuration leaves unused, from the tables of what each choice reads."""
from nncore.init import INIT_READS
from nncore.model import ACTIVATION_READS, ARCH_READS, MODEL_DEFAULTS
from nncore.optim import READS as UPDATE_READS
from nncore.schedules import SCHEDULE_READS
from nncore.solver import SOLVER_DEFAULTS

# (section, the field that chooses, what each choice reads): a field some choice reads is unused by the others.
SWITCHES = (
    ("solver", "update", UPDATE_READS),
    ("solver", "lr_schedule", SCHEDULE_READS),
    ("model", "arch", ARCH_READS),
    ("model", "activation", ACTIVATION_READS),
    ("model", "init", INIT_READS),
)


def unused_fields(model, solver):
    """{dotted field: why it is unused} for every field that no choice made by ``model``/``solver`` reads."""
    sections = {"model": {**MODEL_DEFAULTS, **model}, "solver": {**SOLVER_DEFAULTS, **solver}}
    read, unused = set(), {}
    for section, switch, table in SWITCHES:
        chosen = sections[section][switch]
        read.update(f"{section}.{f}" for f in table.get(chosen, ()))
        for name in (f"{section}.{f}" for reads in table.values() for f in reads):
            unused.setdefault(name, f"{section}.{switch} = {chosen!r} does not read it")
    return {name: why for name, why in unused.items() if name not in read}

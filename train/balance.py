"""Balanced sampling of rare findings: the records of a study positive for a boosted finding are
repeated in a stage's training pool, before the task mix.

Why: the phantoms' local findings (effusion, pneumothorax, consolidation) are positive in a
fifth to a quarter of the studies, so a model unsure of one settles on the prior and writes
"No effusion."; a greedy decoder has no threshold to lower. Seeing the positives more often
moves the prior, so the decision at the findings checklist calls what the image shows. The
task mix keeps each task's share: boosting changes which studies a task draws, not how much
of each task a stage sees.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from cxrlite.data.labels import POSITIVE
from cxrlite.data.records import Study, TaskRecord
from cxrlite.data.tasks import study_chexpert


def study_repeats(study: Study, boost: dict[str, float]) -> float:
    """How many times a study's records appear: the largest boost among its positive findings
    (1 when it has none)."""
    labels = study_chexpert(study)
    return max([1.0, *(w for obs, w in boost.items() if labels.get(obs) == POSITIVE)])


def oversample_positives(
    records: Sequence[TaskRecord],
    studies: Sequence[Study],
    boost: dict[str, float],
    seed: int = 0,
    tasks: Collection[str] | None = None,
) -> list[TaskRecord]:
    """The records, each repeated its study's `study_repeats` times: the whole part always, the
    fractional part with that probability (a stream per record, so the pool is the same in every
    run and on every rank). With `tasks`, only those tasks' records are repeated: the others
    keep the studies' own distribution (a view task would otherwise learn that sick patients
    are AP)."""
    if not boost:
        return list(records)
    if any(not w >= 1 for w in boost.values()):
        raise ValueError(f"boosts must be >= 1 (a repeat factor), got {boost}")
    repeats = {s.id: study_repeats(s, boost) for s in studies}
    pool = []
    for record in records:
        factor = repeats.get(record.id.rsplit(":", 2)[0], 1.0)
        if tasks is not None and record.task not in tasks:
            factor = 1.0
        whole = int(factor)
        extra = random.Random(f"oversample:{seed}:{record.id}").random() < factor - whole
        pool.extend([record] * (whole + extra))
    return pool

"""The one-class robust / non-robust feature study (Lau et al. 2024, after Ilyas et al. 2019).

Question: are the non-robust features that fool a lightweight detector *useful* for the
one-class task? Every cell of the study (normal class x seed; the seed covers construction and
training) builds training sets, trains fresh models on them (each from its own init seed, never
the seed of the model whose features were planted) and tests them on the class's full test
split. The one-class branch (`one_class`) answers the paper's question with FIRM detectors
trained on feature inversions; the binary branch (`binary`) keeps Ilyas et al.'s D_det / D_rand
for a binary classifier as a surrogate. Every construction has floors that stop its stage; the
verdict of every set follows one rule (`stats.RULE`) from t-intervals over seeds.

Modules, one job each: `config` (the recipe's schema and the sets' names), `cell` (a cell's
data and branches), `models` (training with fresh seeds, testing), `binary` and `one_class`
(the branches), `stats` (intervals and the rule), `markdown` (study.md), `runner` (the cells
through the bench executors, study.json). Every stage writes its artefacts into the study
directory and is skipped when they are there, so an interrupted study resumes.
"""

from firmad.robustness.study.cell import Cell, run_cell_process
from firmad.robustness.study.config import (
    BINARY_SETS,
    ConstructionError,
    StudyConfig,
    one_class_sets,
    read_study,
)
from firmad.robustness.study.markdown import study_markdown
from firmad.robustness.study.models import fresh_seed, init_digest, step_plan
from firmad.robustness.study.runner import Study, run_study
from firmad.robustness.study.stats import RULE, rule, summarise, t_interval

__all__ = [
    "BINARY_SETS",
    "RULE",
    "Cell",
    "ConstructionError",
    "Study",
    "StudyConfig",
    "fresh_seed",
    "init_digest",
    "one_class_sets",
    "read_study",
    "rule",
    "run_cell_process",
    "run_study",
    "step_plan",
    "study_markdown",
    "summarise",
    "t_interval",
]

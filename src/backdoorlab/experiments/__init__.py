"""Experiments: reproduce a paper's evaluation from one YAML file and one command.

``backdoorlab run FILE --out DIR`` loads and checks the file (:mod:`.spec`), expands it into cells
that share work (:mod:`.grid`), runs the unfinished ones locally or on Ray (:mod:`.executors`,
:mod:`.runner`), keeps one results table (:mod:`.table`) and writes ``report.md`` with the file's
tables and figures (:mod:`.report`, :mod:`.figures`).
"""

from .executors import CELL_RUNNERS, EXECUTORS, Executor, LocalExecutor, RayExecutor, execute_cell
from .figures import PLOTS
from .grid import Cell, Grid, expand
from .report import TABLES, check_outputs, write_report
from .runner import TABLE_FILE, GridResult, prepare, rebuild_report, run_experiment
from .spec import Experiment, Resources, load_experiment, parse_experiment
from .table import ResultsTable, cell_rows

__all__ = [
    "CELL_RUNNERS", "EXECUTORS", "PLOTS", "TABLES", "TABLE_FILE", "Cell", "Executor", "Experiment", "Grid", "GridResult",
    "LocalExecutor", "RayExecutor", "Resources", "ResultsTable", "cell_rows", "check_outputs", "execute_cell", "expand",
    "load_experiment", "parse_experiment", "prepare", "rebuild_report", "run_experiment", "write_report",
]

"""``nt-dist pipeline FILE.yaml``: a paper table (or any grid) as a dependency graph of runs.

A pipeline file names normal teachers (rows), nasty teachers (rows, each against a named normal
teacher as its adversary) and students (columns, each distilled from every row and trained
alone as the column's baseline), the seeds, and an optional sweep over recipe keys::

    pipeline: table1                  # tags every run (MLflow tag `table`) and names it
    paper: table1                     # nt_dist/paper_tables.yaml key shown beside the cells
    experiment: paper-table1          # MLflow experiment of every stage
    output_dir: runs/paper/table1     # stage folders: <output_dir>/seed<k>/<stage>/...
    launcher: local                   # local | an accelerate config (cluster/single_gpu.yaml, ...)
    seeds: [0, 1, 2]
    set: {data.root: data}            # overrides for every stage
    teachers:
      ResNet-18 normal: {recipe: cifar10/teacher.yaml, set: {model.name: cifar_resnet18}}
    nasty:
      ResNet-18 nasty: {recipe: cifar10/nasty.yaml, adversary: ResNet-18 normal}
    students:
      CNN: {recipe: cifar10/student_cnn.yaml}
      self: {recipe: cifar10/student.yaml, self: true}   # the row teacher's own architecture
    sweep: {nasty.omega: [0.001, 0.004, 0.04]}           # or {key: {values: [...], stages: [...]}}
    slurm: {time: "12:00:00", nodes: 1, gpus-per-node: 1}  # sbatch options for --submit slurm

:func:`expand` turns it into :class:`Stage` s (pure: no file is read but the pipeline's); a
stage's folder is named by what shapes it (kind, label, the teacher it learns from, the sweep
values that reach it), so a normal teacher is trained once for every ω of a sweep. :func:`run`
executes the graph on this machine — in this process, or ``--parallel N`` stages at once as
subprocesses, or each through ``accelerate launch --config_file LAUNCHER`` — skipping stages
whose folder already holds the finished run of the same recipe; a failed stage stops its
dependants, not its siblings. :func:`submit_slurm` hands every stage to ``sbatch`` chained with
``--dependency=afterok`` so the cluster's scheduler runs (and requeues) the graph.

The package's rooms, each importing only those before it:

- :mod:`~nt_dist.pipeline.schema`: the file's schema, :func:`load_pipeline` and its checks;
- :mod:`~nt_dist.pipeline.graph`: :class:`Stage` and :func:`expand`;
- :mod:`~nt_dist.pipeline.runners`: :func:`run` on this machine, :func:`summary`, :func:`describe_plan`;
- :mod:`~nt_dist.pipeline.slurm`: :func:`submit_slurm`.
"""

from nt_dist.pipeline.graph import Stage, expand, output_root, sweep_points, sweep_targets
from nt_dist.pipeline.runners import (
    Outcome,
    describe_plan,
    exit_code,
    is_stale,
    run,
    stage_command,
    stage_state,
    summary,
    validate_stages,
)
from nt_dist.pipeline.schema import (
    BASELINE_ROW,
    KINDS,
    TEACHER_COLUMN,
    DefenceSpec,
    Kind,
    NastySpec,
    Pipeline,
    PipelineSpec,
    StudentSpec,
    SweepSpec,
    TeacherSpec,
    load_pipeline,
)
from nt_dist.pipeline.slurm import default_sbatch_script, submit_slurm

__all__ = [
    "BASELINE_ROW",
    "KINDS",
    "TEACHER_COLUMN",
    "DefenceSpec",
    "Kind",
    "NastySpec",
    "Outcome",
    "Pipeline",
    "PipelineSpec",
    "Stage",
    "StudentSpec",
    "SweepSpec",
    "TeacherSpec",
    "default_sbatch_script",
    "describe_plan",
    "exit_code",
    "expand",
    "is_stale",
    "load_pipeline",
    "output_root",
    "run",
    "stage_command",
    "stage_state",
    "submit_slurm",
    "summary",
    "sweep_points",
    "sweep_targets",
    "validate_stages",
]

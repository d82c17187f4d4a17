"""The launcher: train a recipe on SLURM, on this machine, or print what would be launched.

    python launch/slurm.py RECIPE [key.path=value ...] [--local [--nproc N]] [--dry-run] [--wait] [--sweep]
    python -m hybrid_megatron.launch ...   (the same; also the ``hybrid-megatron-launch`` command)

One module per concern, each calling only those after it:

- `cli`: the command line and ``main`` (the options, the dry run, exit codes).
- `sweep`: a sweep file's runs as one SLURM job array, or one after another with ``--local``.
- `slurm`: the sbatch parameters and script, submission through submitit, ``--wait``.
- `local`: the same job through submitit's LocalExecutor on this machine.
- `follow`: streaming rank 0's log while a job runs, and the report of its end.
- `plan`: what is checked before anything runs (the recipe, the world size, the derived numbers).
- `job`: `TrainJob`, the callable every rank runs (rendezvous, preemption, input errors).

Importing any of them changes nothing global; ``cli.main`` and ``TrainJob.__call__`` set the
process up (``hybrid_megatron.runtime.setup``).
"""

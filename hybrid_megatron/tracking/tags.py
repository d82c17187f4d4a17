"""The MLflow tags a training run carries (written by `RunTracker`, read by sweeps and the
scaling analysis): one name each, so writer and readers cannot drift apart."""

TAG_KIND = "hm.kind"  # model.kind
TAG_SCALE = "hm.scale"  # tracking.scale
TAG_GROUP = "hm.compare_group"  # tracking.compare_group: the runs compared with each other
TAG_MATCH = "hm.match"  # tracking.match: P parameter-matched, F FLOP-matched
TAG_VARIANT = "hm.variant"  # tracking.variant: an ablation, compared as <kind>-<variant>
TAG_RUN_NAME = "mlflow.runName"  # MLflow's own: the run's name

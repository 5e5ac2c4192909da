"""verlyard_scheduler: folds events into DAG state and decides what runs where."""

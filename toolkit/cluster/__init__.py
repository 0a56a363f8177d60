"""Running on Slurm: task ranks from the job environment (env), submission and requeue (slurm)."""

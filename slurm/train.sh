#!/bin/bash
# A training stage as a plain Slurm batch job. One script under three names: slurm/pretrain.sh
# and slurm/finetune.sh are symbolic links to this file, and the name a job was submitted under
# gives its default recipe:
#
#   sbatch slurm/pretrain.sh [RECIPE] [key=value ...]   RECIPE defaults to recipes/pretrain.yaml
#   sbatch slurm/finetune.sh [RECIPE] [key=value ...]   RECIPE defaults to recipes/finetune.yaml
#   sbatch slurm/train.sh RECIPE [key=value ...]        any stage; no default
#
# The job runs in the directory sbatch was called from (recipe paths are relative to it). Its size
# comes from the header below, not from the recipe's `cluster` section (that one is read by
# `python -m toolkit.launch`); sbatch flags on the command line win over the header:
#
#   sbatch --nodes=4 --partition=gpu --account=proj slurm/pretrain.sh recipes/pretrain.yaml train.epochs=10
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 slurm/finetune.sh recipes/debug.yaml  # CPU
#
# Which name: sbatch reads this file through the link, and Slurm runs a copy of it from its spool
# directory, so neither $0 nor the submit directory tells. The job's Command (`scontrol show job`)
# does: the path sbatch was given, made absolute (Slurm 22.05 appends the arguments). The job name
# is that path's last part (pretrain.sh, finetune.sh: Slurm's default, since one file holds one
# header); --job-name changes the name, not the default recipe.
#
# One task per GPU runs `$SRMAE_PYTHON -m toolkit.train RECIPE key=value ...` (default `python`;
# it must import toolkit). Each task derives its own RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the
# first host of the node list) and MASTER_PORT (from the job id) from its SLURM_* variables
# (toolkit/cluster/env.py): nothing per task is expanded here, since this script runs on the first
# node only.
#
# Time limit and preemption: Slurm sends USR2 to the tasks 120 s before the limit (also
# `scancel --signal=USR2 JOBID`); they finish the step, write a checkpoint and exit with status 3;
# this script then requeues the job, which resumes from that checkpoint in the same run directory.
#
# Log: slurm-<job name>-<job id>.out in the directory sbatch was called from (slurm-pretrain.sh-
# 4711.out), appended to across requeues (--output cannot depend on the recipe, and Slurm creates
# no folder for it: a folder that does not exist yet would make the job fail without a word).
#
# CPUs: every task gets --cpus-per-task of them (its data-loading workers live there); srun is
# told so explicitly, since srun of Slurm 22.05-23.02 does not take it from the job.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

recipe=
case ${1-} in
    *.yaml | *.yml) recipe=$1 && shift ;;
esac
if [ -z "$recipe" ]; then
    # Command=/abs/path/slurm/pretrain.sh, then " $*" on Slurm 22.05 (no argument was shifted).
    submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')
    submitted=${submitted%" $*"}
    case ${submitted##*/} in
        pretrain.sh) recipe=recipes/pretrain.yaml ;;
        finetune.sh) recipe=recipes/finetune.yaml ;;
        *)
            echo "error: ${submitted##*/} has no default recipe; name one:" \
                "sbatch slurm/train.sh RECIPE [key=value ...]" >&2
            exit 2
            ;;
    esac
fi
python=${SRMAE_PYTHON:-python}
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${recipe} $*" >&2

# A task that fails ends the others 30 s later (--wait) instead of leaving them in a collective
# until the time limit. Not --kill-on-bad-exit=1: the first task to exit with status 3 would get
# the others terminated, and srun would then report their SIGTERM (143), not 3.
srun --kill-on-bad-exit=0 --wait=30 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    "$python" -m toolkit.train "$recipe" "$@"
status=$?
# Only a job that is still running: the tasks also stop on the SIGTERM of `scancel` and of the
# time limit, and a cancelled job must stay cancelled.
if [ "$status" -eq 3 ] && scontrol show job "$SLURM_JOB_ID" | grep -q "JobState=RUNNING"; then
    echo "job ${SLURM_JOB_ID}: stopped by a signal after a checkpoint; requeueing" >&2
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$status"

#!/bin/bash
#SBATCH --job-name=crash-train
#SBATCH --time=12:00:00
# Near the time limit Slurm sends SIGUSR1 to the tasks: the trainer writes a checkpoint and
# exits with code 3, and this script requeues the job, which resumes from that checkpoint.
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
# Fine-tunes the adapters of the emulator of CRASH_MODE: $WORK/<mode>/train.
source "${CRASH_SLURM_DIR:-$(dirname "$0")}/common.sh"
mode=${CRASH_MODE:?set CRASH_MODE to uniform, remove or share}
require train-task
out=$WORK/$mode/train
# model/ is written at every new best validation loss: only the marker written below says training
# finished (as in the pipeline job). A requeued run (SLURM_RESTART_COUNT > 0) always resumes.
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || skip_if_done "$out/finished"
emulator=$WORK/$mode/emulator
preflight "$WORK/$mode" "$emulator"
args=(--model "$emulator" --data "$(prepared "$(cfg train-task)")" --out "$out" --steps "$(cfg steps 200)"
      --lr "$(cfg lr 1e-4)" --warmup "$(cfg warmup 20)" --batch-size "$(cfg batch-size 16)" --seed "$(cfg seed 1234)"
      --dtype "$DTYPE" --save-every "$(cfg save-every 50)" $(grid_args))
if [ -n "$(cfg valid-task)" ]; then
  args+=(--val-data "$(prepared "$(cfg valid-task)")")
  [ "$(cfg eval-every 0)" -le 0 ] || args+=(--eval-every "$(cfg eval-every)")
fi
if [ -n "$(ls -A "$out/checkpoints" 2>/dev/null)" ]; then
  args+=(--resume)
elif [ -e "$out" ]; then
  args+=(--overwrite)
fi
crash_srun train "${args[@]}"
rc=$?
if [ $rc -eq 3 ]; then
  echo "crash-hpc slurm: training stopped with a checkpoint; requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit train.sh to resume"
  exit 0
fi
[ $rc -ne 0 ] || echo "$(cfg steps 200) steps of $mode" > "$out/finished"
exit $rc

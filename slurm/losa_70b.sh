#!/bin/bash
# LoSA on LLaMA-2/3-70B under DeepSpeed ZeRO-3, from one 8-GPU node upward.
#
#   MODEL=/models/Llama-2-70b-hf CALIB=c4.jsonl TRAIN_DATA=alpaca.json sbatch slurm/losa_70b.sh
#   MODEL=... sbatch --nodes=4 -p gpu -A myproj slurm/losa_70b.sh     (EXTRA_ARGS='batch_size=32')
#
# Submit from the repository root (or set LOSA_ZERO_HOME). The #SBATCH lines are defaults for
# A100 80GB nodes; sbatch flags override them (--nodes, --gpus-per-node, --time, -p PARTITION,
# -A ACCOUNT, -q QOS; or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS / SBATCH_TIMELIMIT in
# the environment). Partition and account are deliberately not set here: they are per site.
#
# Environment variables (all optional except MODEL and the data, which may also come from CONFIG):
#   MODEL            Hugging Face model directory (local; read-only)
#   CALIB            calibration text, [text|jsonl|alpaca|wikitext2:]PATH   (run-config key calib)
#   TRAIN_DATA       fine-tuning data, same format                          (key train)
#   PPL              texts to score at the end, comma-separated              (key ppl)
#   OUTPUT_DIR       everything of this run: model/ (the export), checkpoints/ (ZeRO-3 shards, dense
#                    targets, metrics), logs/, run.yaml, DONE      default: $SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME
#   RECIPE           LoSA hyperparameters (YAML)                   default: slurm/configs/losa_70b.yaml
#   CONFIG           another run-config YAML layered over RECIPE (site data paths, anything)
#   EXTRA_ARGS       key=value overrides, last word ("sparsity=0.5 nsamples=64")
#   DS_CONFIG        DeepSpeed config; when set it decides the offload (the planner must agree it fits)
#   OFFLOAD          auto (default here: no offload if it fits, else CPU, else NVMe), none, cpu, nvme
#   NVME_PATH        local NVMe directory for OFFLOAD=nvme                   default: /local_nvme
#   NPROC_PER_NODE   ranks per node                  default: the GPUs SLURM gave the job (1 on CPU)
#   GPU_MEMORY_GB    per GPU, for the planner        default: nvidia-smi, else 80
#   HOST_MEMORY_GB   per node, for the planner       default: the job's memory (--mem), else MemTotal
#   LAUNCHER         torchrun (one per node, c10d rendezvous on the first node; default), srun (one
#                    task per GPU, ranks from SLURM_PROCID), mpi (srun --mpi=$SRUN_MPI, default pmix;
#                    MPI_LAUNCHER=mpirun for mpirun)
#   SRUN_CPU_BIND    --cpu-bind of each task (LAUNCHER=srun or mpi via srun)   default: cores
#   SRUN_GPU_BIND    --gpu-bind of each task on GPU jobs (same launchers)       default: per_task:1
#                    (one GPU per task; the rank uses the one device it sees)
#   PYTORCH_CUDA_ALLOC_CONF  default on GPU jobs: expandable_segments:True (kept when set)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG (default on GPU jobs: WARN), any NCCL_* / TORCH_NCCL_*,
#   GLOO_SOCKET_IFNAME
#                    passed to every rank (by name with -x for mpirun) and logged at launch
#   MASTER_ADDR      rendezvous host                 default: NodeAddr of the first allocated node
#   MASTER_PORT      rendezvous port                 default: 20000 + job id % 20000
#   PYTHON           interpreter with losa-zero installed                    default: python3
#   STOP_GRACE       seconds to wait for the checkpoint after USR1/TERM before requeueing anyway
#                    (keep it below the --signal lead time)                  default: 840
#   MAX_REQUEUES     give up after this many requeues                        default: 50
#   DEVICE           gpu or cpu                      default: gpu when the job has GPUs
#   LOSA_ZERO_HOME   the repository                  default: where this script was submitted from
#
# Preemption / time limit: SLURM sends USR1 to this shell 900 s before the end (--signal); the
# shell relays it to every rank, the ranks agree on the next optimizer step (or LoSA step end),
# write a checkpoint and exit 75, and the job requeues itself (`scontrol requeue`); the requeued
# job resumes from the newest complete checkpoint (resume: auto). A job whose run already
# finished (OUTPUT_DIR/DONE) exits 0 at once. The planner (losa-zero plan) runs before every
# launch: without a fit even with offload the job stops with the numbers (exit 3, no requeue).
#
#SBATCH --job-name=losa-70b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

if [ -z "${LOSA_ZERO_HOME:-}" ]; then
    # sbatch runs a copy of this script: find the original through the job record
    _cmd=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p' | head -1)
    for _d in "${_cmd:+$(dirname "$_cmd")/..}" "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
        if [ -n "$_d" ] && [ -f "$_d/slurm/_common.sh" ]; then LOSA_ZERO_HOME=$(cd "$_d" && pwd); break; fi
    done
fi
[ -f "${LOSA_ZERO_HOME:-}/slurm/_common.sh" ] || { echo "set LOSA_ZERO_HOME to the losa-zero repository" >&2; exit 1; }
export LOSA_ZERO_HOME

RECIPE=${RECIPE:-$LOSA_ZERO_HOME/slurm/configs/losa_70b.yaml}
OFFLOAD_DEFAULT=auto
STOP_GRACE=${STOP_GRACE:-840}
# shellcheck source=slurm/_common.sh
source "$LOSA_ZERO_HOME/slurm/_common.sh"
losa_main

# shellcheck shell=bash
# Shared body of slurm/losa_13b.sh and slurm/losa_70b.sh (sourced, not run). See the
# variables documented at the top of those scripts and in the README ("SLURM").
#
# One job start, in order:
#   1. resolve the settings (environment variables, then the hardware SLURM gave us);
#   2. exit 0 at once when the run already finished (OUTPUT_DIR/DONE or the exported model);
#   3. write OUTPUT_DIR/run.yaml (RECIPE < CONFIG < the job's own keys < EXTRA_ARGS);
#   4. ask the planner (losa-zero plan) whether it fits; choose the offload (OFFLOAD=auto) or
#      stop with the planner's numbers when nothing fits;
#   5. launch: one torchrun per node (c10d rendezvous on the first node), or one task per
#      GPU (LAUNCHER=srun), or MPI (LAUNCHER=mpi); resume=auto picks up any checkpoint;
#   6. on USR1 / TERM: relay the signal to the job steps, wait for the checkpoint (at most
#      STOP_GRACE seconds), then `scontrol requeue` this job. A run that stopped for a
#      signal exits 75 and leaves OUTPUT_DIR/checkpoints/PREEMPTED.json.

set -uo pipefail

LOSA_REQUEUE_EXIT=75
LOSA_STOP_SIGNAL=""
LOSA_CHILD=""
LOSA_DEADLINE_PID=""

losa_log() { echo "[losa-slurm $(date +%H:%M:%S)] $*"; }
losa_die() { echo "[losa-slurm $(date +%H:%M:%S)] ERROR: $*" >&2; exit "${2:-1}"; }

# -- settings ----------------------------------------------------------------------------------
losa_settings() {
    : "${SLURM_JOB_ID:?run this script with sbatch (SLURM_JOB_ID is not set)}"
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null 2>&1 || losa_die "PYTHON=$PYTHON not found"
    export PYTHONPATH="$LOSA_ZERO_HOME${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

    JOB_NAME=${SLURM_JOB_NAME:-losa}
    OUTPUT_DIR=${OUTPUT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$JOB_NAME}
    RESTART=${SLURM_RESTART_COUNT:-0}
    NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
    MAX_REQUEUES=${MAX_REQUEUES:-50}
    LAUNCHER=${LAUNCHER:-torchrun}
    MPI_LAUNCHER=${MPI_LAUNCHER:-srun}

    # GPUs: what SLURM / the driver says; none means a CPU run (gloo, DS_ACCELERATOR=cpu)
    local ngpu=0
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        ngpu=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
        ngpu=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    DEVICE=${DEVICE:-$([ "${ngpu:-0}" -gt 0 ] && echo gpu || echo cpu)}
    if [ "$DEVICE" = gpu ]; then
        NPROC_PER_NODE=${NPROC_PER_NODE:-$ngpu}
        GPU_MEMORY_GB=${GPU_MEMORY_GB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
                                          | head -1 | awk '{printf "%d", $1 * 1048576 / 1e9}')}
        GPU_MEMORY_GB=${GPU_MEMORY_GB:-80}
    else
        NPROC_PER_NODE=${NPROC_PER_NODE:-1}
        GPU_MEMORY_GB=${GPU_MEMORY_GB:-0}
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
    [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || losa_die "NPROC_PER_NODE=$NPROC_PER_NODE: need at least 1 rank per node"
    losa_comm_env
    if [ -z "${HOST_MEMORY_GB:-}" ]; then
        if [ -n "${SLURM_MEM_PER_NODE:-}" ] && [ "${SLURM_MEM_PER_NODE}" != 0 ]; then
            HOST_MEMORY_GB=$(awk -v m="$SLURM_MEM_PER_NODE" 'BEGIN {printf "%d", m * 1048576 / 1e9}')
        else
            HOST_MEMORY_GB=$(awk '/MemTotal/ {printf "%d", $2 * 1024 / 1e9}' /proc/meminfo)
        fi
    fi
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))}

    # the rendezvous host: the first node of the allocation, as its address (NodeAddr)
    local first
    first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -1)
    first=${first:-$(hostname)}
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(scontrol show node "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -1)
        MASTER_ADDR=${MASTER_ADDR:-$first}
    fi
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    export MASTER_ADDR MASTER_PORT

    CKPT_DIR=$OUTPUT_DIR/checkpoints
    MODEL_OUT=$OUTPUT_DIR/model
    LOG_DIR=$OUTPUT_DIR/logs/job-$SLURM_JOB_ID-restart-$RESTART
    STOP_GRACE=${STOP_GRACE:-540}
}

# -- GPU memory and communication environment ----------------------------------------------------
# Every variable below is read by the ranks, so it must reach them: srun (--export=ALL) and
# torchrun pass the whole environment on; mpirun only what is named with -x (losa_passthrough).
LOSA_PASS_RE='^(NCCL_[A-Z0-9_]+|TORCH_NCCL_[A-Z0-9_]+|GLOO_SOCKET_IFNAME|PYTORCH_CUDA_ALLOC_CONF|PYTORCH_ALLOC_CONF|CUDA_DEVICE_MAX_CONNECTIONS)$'

losa_comm_env() {
    if [ "$DEVICE" = gpu ]; then
        # LoSA's phases allocate very different shapes (calibration batches, a gathered block,
        # the pruning workspace, fine-tuning activations): expandable segments give freed
        # memory back to the next phase instead of leaving it fragmented in fixed-size blocks
        if [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}${PYTORCH_ALLOC_CONF:-}" ]; then
            export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
        fi
        # NCCL prints nothing but its own errors by default; WARN adds why a communicator
        # failed (which interface, which HCA) to the job's log at no cost
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    fi
}

losa_passthrough() {  # names of the set variables matching LOSA_PASS_RE, one per line
    compgen -e | grep -E "$LOSA_PASS_RE" || true
}

# -- the run config ------------------------------------------------------------------------------
losa_write_config() {
    mkdir -p "$OUTPUT_DIR" "$LOG_DIR" || losa_die "cannot create OUTPUT_DIR=$OUTPUT_DIR"
    local recipe=${RECIPE:-}
    [ -z "$recipe" ] || [ -f "$recipe" ] || [ -f "$LOSA_ZERO_HOME/$recipe" ] || losa_die "RECIPE=$recipe not found"
    [ -f "$recipe" ] || recipe=${recipe:+$LOSA_ZERO_HOME/$recipe}
    [ -z "${CONFIG:-}" ] || [ -f "$CONFIG" ] || losa_die "CONFIG=$CONFIG not found"
    local sets=("out=$MODEL_OUT" "checkpoint_dir=$CKPT_DIR" "resume=auto")
    [ -n "${MODEL:-}" ] && sets+=("model=$MODEL")
    [ -n "${CALIB:-}" ] && sets+=("calib=$CALIB")
    [ -n "${TRAIN_DATA:-}" ] && sets+=("train=$TRAIN_DATA")
    [ -n "${PPL:-}" ] && sets+=("ppl=$PPL")
    [ -n "${DS_CONFIG:-}" ] && sets+=("deepspeed=$DS_CONFIG")
    # shellcheck disable=SC2206  # EXTRA_ARGS is a list of key=value words
    local extra=(${EXTRA_ARGS:-})
    RUN_CONFIG=$OUTPUT_DIR/run.yaml
    "$PYTHON" -m losa_zero.slurm_job write-config "$RUN_CONFIG" ${recipe:+--layer "$recipe"} \
        ${CONFIG:+--layer "$CONFIG"} "${sets[@]}" "${extra[@]}" || losa_die "could not write $RUN_CONFIG"
    local key
    for key in model calib train; do
        "$PYTHON" -m losa_zero.slurm_job get "$RUN_CONFIG" "$key" >/dev/null \
            || losa_die "no '$key' in the run config: set $( [ $key = train ] && echo TRAIN_DATA || echo "${key^^}") or put $key: in CONFIG"
    done
}

# -- the planner: fit, offload, or stop ------------------------------------------------------------
losa_plan() {
    local model ds_given offload
    model=$("$PYTHON" -m losa_zero.slurm_job get "$RUN_CONFIG" model)
    ds_given=$("$PYTHON" -m losa_zero.slurm_job get "$RUN_CONFIG" deepspeed "")
    local args=(--model "$model" --nodes "$NNODES" --gpus-per-node "$NPROC_PER_NODE" --host-memory "$HOST_MEMORY_GB"
                --run-config "$RUN_CONFIG" --device "$DEVICE" --json "$LOG_DIR/plan.json")
    [ "$DEVICE" = gpu ] && args+=(--gpu-memory "$GPU_MEMORY_GB")
    if [ -n "$ds_given" ]; then
        # DS_CONFIG (or deepspeed: in CONFIG) decides the offload; the plan must fit it
        [ -n "${OFFLOAD:-}" ] && losa_log "OFFLOAD=$OFFLOAD ignored: the DeepSpeed config $ds_given decides"
        args+=(--deepspeed "$ds_given")
    else
        offload=${OFFLOAD:-${OFFLOAD_DEFAULT:-none}}
        args+=(--offload "$offload")
    fi
    losa_log "planner: losa-zero plan ${args[*]}"
    "$PYTHON" -m losa_zero.plan "${args[@]}"
    local rc=$?
    if [ $rc -eq 3 ]; then
        losa_die "the run does not fit ${NNODES} node(s) x ${NPROC_PER_NODE} GPU(s) of ${GPU_MEMORY_GB} GB with \
${HOST_MEMORY_GB} GB host memory per node (numbers above; also $LOG_DIR/plan.json). Ask for more nodes \
(sbatch --nodes=N), allow offload (OFFLOAD=auto|cpu|nvme, unset DS_CONFIG), or shrink the calibration \
(EXTRA_ARGS='nsamples=64'). Not requeued." 3
    elif [ $rc -ne 0 ]; then
        losa_die "the planner failed (exit $rc)" $rc
    fi
    [ -n "$ds_given" ] && return 0
    local chosen ds
    chosen=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['inputs']['offload'])" "$LOG_DIR/plan.json")
    case "$chosen" in
        none) if [ "$DEVICE" = cpu ]; then ds=$LOSA_ZERO_HOME/ds_configs/zero3_cpu_test.json
              else ds=$LOSA_ZERO_HOME/ds_configs/zero3.json; fi ;;
        cpu)  ds=$LOSA_ZERO_HOME/ds_configs/zero3_offload_cpu.json ;;
        nvme) local nvme_dir=${NVME_PATH:-/local_nvme}/$JOB_NAME-$SLURM_JOB_ID
              mkdir -p "$nvme_dir" 2>/dev/null \
                  || losa_die "the plan needs NVMe offload but NVME_PATH=${NVME_PATH:-/local_nvme} is not writable: set NVME_PATH" 3
              ds=$OUTPUT_DIR/ds_config.nvme.json
              "$PYTHON" -c 'import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["zero_optimization"]["offload_param"]["nvme_path"] = sys.argv[3]
json.dump(cfg, open(sys.argv[2], "w"), indent=1)' "$LOSA_ZERO_HOME/ds_configs/zero3_offload_nvme.json" "$ds" "$nvme_dir" \
                  || losa_die "could not write $ds" ;;
        *) losa_die "planner chose an unknown offload '$chosen'" ;;
    esac
    losa_log "planner: offload $chosen -> DeepSpeed config $ds"
    "$PYTHON" -m losa_zero.slurm_job write-config "$RUN_CONFIG" --layer "$RUN_CONFIG" "deepspeed=$ds" \
        || losa_die "could not update $RUN_CONFIG"
}

# -- signals ---------------------------------------------------------------------------------------
losa_on_signal() {
    local sig=$1
    if [ -n "$LOSA_STOP_SIGNAL" ]; then
        losa_log "got $sig again; still waiting for the checkpoint"
        return
    fi
    LOSA_STOP_SIGNAL=$sig
    losa_log "got $sig: asking every rank to checkpoint and stop (at most ${STOP_GRACE}s)"
    if [ -n "$LOSA_CHILD" ] && kill -0 "$LOSA_CHILD" 2>/dev/null; then
        # srun forwards the signal to every task of the step (torchrun forwards it to its
        # workers: --signals-to-handle); mpirun forwards USR1 to its ranks
        kill -s "$sig" "$LOSA_CHILD" 2>/dev/null || true
    fi
    # a checkpoint that never comes (a rank stuck in a long non-interruptible phase): requeue
    # anyway once the grace time is over; the newest complete checkpoint is used
    ( sleep "$STOP_GRACE"; kill -s ALRM $$ 2>/dev/null ) &
    LOSA_DEADLINE_PID=$!
}

losa_on_deadline() {
    losa_log "no clean stop within ${STOP_GRACE}s: requeueing now (resume from the newest complete checkpoint)"
    losa_requeue
}

losa_requeue() {
    if [ "$RESTART" -ge "$MAX_REQUEUES" ]; then
        losa_die "already requeued $RESTART times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing again" 1
    fi
    losa_log "requeueing job $SLURM_JOB_ID (restart $((RESTART + 1))); it resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || losa_die "scontrol requeue $SLURM_JOB_ID failed (is --requeue allowed here?)"
    exit 0
}

# -- launch ----------------------------------------------------------------------------------------
losa_launch_cmd() {
    local train=("$LOSA_ZERO_HOME/train/losa.py" "$RUN_CONFIG")
    LAUNCH=()
    # One task per GPU (LAUNCHER=srun / mpi through srun): each task gets its share of the
    # node's cores, pinned (SRUN_CPU_BIND, default cores), and exactly one GPU
    # (SRUN_GPU_BIND, default per_task:1: task i of a node sees the node's GPU i as its only
    # device, which the ranks then take as cuda:0). The step keeps the job's GPUs
    # (--gpus-per-node), so no --gpus-per-task request is needed.
    local cpus_per_task=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE : 1 ))
    local bind=(--cpus-per-task="$cpus_per_task" --cpu-bind="${SRUN_CPU_BIND:-cores}")
    [ "$DEVICE" = gpu ] && bind+=(--gpu-bind="${SRUN_GPU_BIND:-per_task:1}")
    case "$LAUNCHER" in
        torchrun)
            # shellcheck disable=SC2054  # the commas belong to --signals-to-handle
            LAUNCH=(srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" --kill-on-bad-exit=1
                    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --export=ALL
                    "$PYTHON" -m torch.distributed.run
                    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
                    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="losa-$SLURM_JOB_ID-$RESTART"
                    --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout="$STOP_GRACE"
                    --log-dir="$LOG_DIR/torchrun" --redirects=3 --tee=3 --local-ranks-filter=0
                    "${train[@]}") ;;
        srun)
            LAUNCH=(srun --nodes="$NNODES" --ntasks-per-node="$NPROC_PER_NODE" --ntasks="$((NNODES * NPROC_PER_NODE))"
                    --kill-on-bad-exit=1 --export=ALL "${bind[@]}" "$PYTHON" "${train[@]}") ;;
        mpi)
            if [ "$MPI_LAUNCHER" = mpirun ]; then
                # mpirun starts its daemons through srun, whose SLURM_PROCID would name the node,
                # not the rank: drop the step's SLURM rank variables so OMPI_COMM_WORLD_* count
                local pass=() name
                while read -r name; do [ -n "$name" ] && pass+=(-x "$name"); done < <(losa_passthrough)
                LAUNCH=(mpirun -np "$((NNODES * NPROC_PER_NODE))" --map-by "ppr:$NPROC_PER_NODE:node"
                        -x MASTER_ADDR -x MASTER_PORT -x PYTHONPATH -x OMP_NUM_THREADS -x DS_ACCELERATOR "${pass[@]}"
                        env -u SLURM_PROCID -u SLURM_LOCALID -u SLURM_NTASKS "$PYTHON" "${train[@]}")
            else
                LAUNCH=(srun --mpi="${SRUN_MPI:-pmix}" --nodes="$NNODES" --ntasks-per-node="$NPROC_PER_NODE"
                        --ntasks="$((NNODES * NPROC_PER_NODE))" --kill-on-bad-exit=1 --export=ALL "${bind[@]}"
                        "$PYTHON" "${train[@]}")
            fi ;;
        *) losa_die "LAUNCHER=$LAUNCHER: use torchrun, srun or mpi" ;;
    esac
}

losa_run() {
    trap 'losa_on_signal USR1' USR1
    trap 'losa_on_signal TERM' TERM
    trap 'losa_on_signal INT' INT
    trap 'losa_on_deadline' ALRM
    "$PYTHON" -c 'import sys; from losa_zero import preemption; preemption.clear_marker(sys.argv[1])' "$CKPT_DIR"
    losa_launch_cmd
    losa_log "launch ($LAUNCHER, $NNODES node(s) x $NPROC_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT): ${LAUNCH[*]}"
    local name passed=()
    while read -r name; do [ -n "$name" ] && passed+=("$name=${!name}"); done < <(losa_passthrough)
    losa_log "passed to the ranks: ${passed[*]:-(no NCCL / allocator variables set)}"
    "${LAUNCH[@]}" &
    LOSA_CHILD=$!
    local rc
    while :; do
        wait "$LOSA_CHILD"
        rc=$?
        # wait returns early (> 128) when a trapped signal arrives: keep waiting for the run
        if kill -0 "$LOSA_CHILD" 2>/dev/null; then continue; fi
        break
    done
    [ -n "$LOSA_DEADLINE_PID" ] && kill "$LOSA_DEADLINE_PID" 2>/dev/null
    LOSA_RC=$rc
}

losa_finish() {
    local rc=$LOSA_RC
    # the export is renamed into place only when complete: its summary.json means done
    if [ -f "$MODEL_OUT/summary.json" ]; then
        [ "$rc" -ne 0 ] && losa_log "warning: the launcher exited with $rc after the model was complete (ignored)"
        date -u +%Y-%m-%dT%H:%M:%SZ > "$OUTPUT_DIR/DONE"
        losa_log "run finished: model in $MODEL_OUT (restarts: $RESTART)"
        exit 0
    fi
    if [ "$rc" -eq "$LOSA_REQUEUE_EXIT" ] || [ -f "$CKPT_DIR/PREEMPTED.json" ] || [ -n "$LOSA_STOP_SIGNAL" ]; then
        losa_log "the run stopped for a signal (exit $rc${LOSA_STOP_SIGNAL:+, $LOSA_STOP_SIGNAL}); checkpoint: $(tr -d '\n' < "$CKPT_DIR/PREEMPTED.json" 2>/dev/null | head -c 300)"
        losa_requeue
    fi
    losa_die "the run failed (exit $rc); logs in $LOG_DIR. Fix the cause and resubmit: it resumes from the newest checkpoint" "$rc"
}

losa_main() {
    losa_settings
    losa_log "job $SLURM_JOB_ID ($JOB_NAME) restart $RESTART on ${SLURM_JOB_NODELIST:-$(hostname)}: $NNODES node(s) x $NPROC_PER_NODE $DEVICE rank(s), OUTPUT_DIR=$OUTPUT_DIR"
    if [ -f "$OUTPUT_DIR/DONE" ] || [ -f "$MODEL_OUT/summary.json" ]; then
        losa_log "already finished ($OUTPUT_DIR/DONE or $MODEL_OUT/summary.json exists): nothing to do"
        exit 0
    fi
    losa_write_config
    losa_plan
    losa_run
    losa_finish
}

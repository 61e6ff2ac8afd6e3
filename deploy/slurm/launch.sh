#!/usr/bin/env bash
# Launch a hypersearch stage on Slurm: enqueue its trials, then submit the workers.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: REDIS_URL=redis://:PASSWORD@HOST:6379/0 $(basename "$0") [options] [-- extra sbatch args]

  -s STAGE     stage to launch (default: \$STAGE or "coarse")
  -d DIR       checkpoint storage on the shared filesystem (default: \$HYPERSEARCH_STORAGE)
  -N NODES     nodes for the workers (default: 1)
  -n TASKS     workers per node = physical cores (default: the #SBATCH value in worker.sbatch)
  -h           this help

Environment: REDIS_URL (required), HYPERSEARCH_VENV (virtualenv on every node, optional).
USAGE
}

STAGE=${STAGE:-coarse}
STORAGE=${HYPERSEARCH_STORAGE:-}
NODES=1
TASKS=""
while getopts "s:d:N:n:h" opt; do
  case $opt in
    s) STAGE=$OPTARG ;;
    d) STORAGE=$OPTARG ;;
    N) NODES=$OPTARG ;;
    n) TASKS=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == "--" ]] && shift

if [[ -z ${REDIS_URL:-} ]]; then
  echo "error: REDIS_URL is not set" >&2
  usage >&2
  exit 2
fi
if [[ -z $STORAGE ]]; then
  echo "error: no storage directory: pass -d DIR or set HYPERSEARCH_STORAGE" >&2
  usage >&2
  exit 2
fi
if [[ ! -d $STORAGE ]]; then
  echo "error: $STORAGE is not a directory (it must be on the shared filesystem)" >&2
  exit 2
fi
if [[ -n ${HYPERSEARCH_VENV:-} ]]; then
  export PATH="$HYPERSEARCH_VENV/bin:$PATH"
fi
export REDIS_URL HYPERSEARCH_STORAGE="$STORAGE"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# master and worker read REDIS_URL from the environment (not --url: argv is world-readable).
master launch --stage "$STAGE" --storage "$STORAGE"

sbatch_args=(--nodes="$NODES" --export=ALL)
if [[ -n $TASKS ]]; then
  sbatch_args+=(--ntasks-per-node="$TASKS")
fi
sbatch "${sbatch_args[@]}" "$@" "$here/worker.sbatch"

#!/usr/bin/env bash
# Data parallelism over MPI (CI): installs Open MPI (scripts/mpi-deps.sh), builds `dinovmf
# --features mpi` and runs host/tests/mpi.rs: `mpirun -np 2` with half the batch per rank
# equals one process with `--shards 2` bit for bit, and resumes bit-exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/mpi-deps.sh
# Open MPI refuses root without these; CI runs as root. Two ranks on two cores: oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
cargo test -p dinovmf --features mpi --test mpi

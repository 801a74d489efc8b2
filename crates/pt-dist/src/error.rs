//! Why a job's ranks cannot work together; the binary adds which flags fix it.

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("ranks disagree on {what} ({values}): every rank must see the same data and files")]
    Disagreement { what: String, values: String },
    /// A collective, or the rendezvous, waited `seconds` in vain.
    #[error("{message}")]
    Timeout { message: String, seconds: u64 },
    #[error(
        "{launcher} started {ranks} ranks, but this pt-host was built without MPI: rebuild with \
         `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
    )]
    BuiltWithoutMpi {
        launcher: &'static str,
        ranks: usize,
    },
    #[error(
        "{launcher} started {ranks} ranks for NCCL, but this pt-host was built without NCCL: \
         rebuild with `cargo build --release --features cuda,nccl`"
    )]
    BuiltWithoutNccl {
        launcher: &'static str,
        ranks: usize,
    },
    #[error("the NCCL backend needs a CUDA device")]
    NcclWithoutCuda,
    #[error(
        "{launcher} says rank {rank} of {ranks}, but MPI sees rank {mpi_rank} of {mpi_ranks}: the MPI backend \
         needs the ranks started by mpirun or `srun --mpi=pmix`"
    )]
    NotStartedByMpi {
        launcher: &'static str,
        rank: usize,
        ranks: usize,
        mpi_rank: usize,
        mpi_ranks: usize,
    },
}

//! Which rank this process is, read from the variables its launcher set:
//! torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`), mpirun
//! (Open MPI's `OMPI_COMM_WORLD_*`, MPICH's `PMI_*`) or SLURM's srun
//! (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`).

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Started by hand: one process.
    Alone,
    Torchrun,
    Mpirun,
    Srun,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Alone => "a single process",
            Launcher::Torchrun => "torchrun",
            Launcher::Mpirun => "mpirun",
            Launcher::Srun => "srun",
        }
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this machine: the GPU it uses.
    pub local_rank: usize,
    /// Processes on this machine.
    pub local_world_size: usize,
    /// Rank 0's address for the NCCL rendezvous (`MASTER_ADDR`), if given.
    pub master_addr: Option<String>,
    /// Its port (`MASTER_PORT`, default 29500).
    pub master_port: u16,
}

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl Launch {
    /// The launch described by this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The launch described by `var` (an environment lookup). torchrun's
    /// variables win: they are the ones a user sets by hand to override.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| {
                        format!("environment variable {name}={v:?} is not a non-negative integer")
                    })
                })
                .transpose()
        };
        // (rank, world size, local rank, local world size) from one
        // launcher's variables; half of a pair is an error, except for
        // SLURM, whose batch script sets SLURM_PROCID outside any srun step.
        let pick = |rank: &str, size: &str, local: &str, local_size: Option<&str>, strict: bool| {
            Ok::<_, anyhow::Error>(match (number(rank)?, number(size)?) {
                (Some(rank), Some(size)) => Some((
                    rank,
                    size,
                    number(local)?.unwrap_or(rank),
                    local_size
                        .map(number)
                        .transpose()?
                        .flatten()
                        .unwrap_or(size),
                )),
                (Some(_), None) if strict => {
                    bail!("{rank} is set but {size} is not: set both, or neither")
                }
                (None, Some(_)) if strict => {
                    bail!("{size} is set but {rank} is not: set both, or neither")
                }
                _ => None,
            })
        };
        let srun = pick(
            "SLURM_PROCID",
            "SLURM_STEP_NUM_TASKS",
            "SLURM_LOCALID",
            None,
            false,
        )?
        .map(|(rank, size, local, _)| {
            // srun states the node count, not the tasks per node.
            let nodes = number("SLURM_STEP_NUM_NODES").ok().flatten().unwrap_or(1);
            (rank, size, local, size.div_ceil(nodes.max(1)))
        });
        let found = [
            (
                Launcher::Torchrun,
                pick(
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                    Some("LOCAL_WORLD_SIZE"),
                    true,
                )?,
            ),
            (
                Launcher::Mpirun,
                pick(
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
                    true,
                )?,
            ),
            (
                Launcher::Mpirun,
                pick(
                    "PMI_RANK",
                    "PMI_SIZE",
                    "MPI_LOCALRANKID",
                    Some("MPI_LOCALNRANKS"),
                    true,
                )?,
            ),
            (Launcher::Srun, srun),
        ]
        .into_iter()
        .find_map(|(launcher, found)| found.map(|f| (launcher, f)));
        let Some((launcher, (rank, world_size, local_rank, local_world_size))) = found else {
            return Ok(Launch {
                launcher: Launcher::Alone,
                rank: 0,
                world_size: 1,
                local_rank: 0,
                local_world_size: 1,
                master_addr: None,
                master_port: DEFAULT_MASTER_PORT,
            });
        };
        if world_size == 0 || rank >= world_size {
            bail!(
                "{} says rank {rank} of {world_size}: the rank must be below the world size",
                launcher.name()
            );
        }
        if local_rank >= world_size {
            bail!(
                "{} says local rank {local_rank} in a world of {world_size}",
                launcher.name()
            );
        }
        let port = match var("MASTER_PORT") {
            Some(port) => port.trim().parse::<u16>().with_context(|| {
                format!("environment variable MASTER_PORT={port:?} is not a port number")
            })?,
            None => DEFAULT_MASTER_PORT,
        };
        Ok(Launch {
            launcher,
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: var("MASTER_ADDR"),
            master_port: port,
        })
    }

    /// Whether every rank runs on this machine.
    pub fn single_node(&self) -> bool {
        self.local_world_size >= self.world_size
    }

    /// Where rank 0 listens for the rendezvous: `MASTER_ADDR:MASTER_PORT`,
    /// or loopback when every rank is on this machine.
    pub fn rendezvous_address(&self) -> Result<(String, u16)> {
        match (&self.master_addr, self.single_node()) {
            (Some(address), _) => Ok((address.clone(), self.master_port)),
            (None, true) => Ok(("127.0.0.1".into(), self.master_port)),
            (None, false) => bail!(
                "{} started ranks on several machines but MASTER_ADDR is not set: export the first node's \
                 address, e.g. `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)`",
                self.launcher.name()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_launcher_is_one_process() {
        let alone = launch(&[]).unwrap();
        assert_eq!(
            (alone.launcher, alone.rank, alone.world_size),
            (Launcher::Alone, 0, 1)
        );
        // A SLURM batch script outside srun has SLURM_NTASKS but is one process.
        let batch = launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap();
        assert_eq!((batch.launcher, batch.world_size), (Launcher::Alone, 1));
    }

    #[test]
    fn each_launcher_is_read() {
        let torchrun = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            torchrun,
            Launch {
                launcher: Launcher::Torchrun,
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: Some("10.0.0.1".into()),
                master_port: 29400,
            }
        );
        assert!(!torchrun.single_node());

        let mpirun = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (mpirun.launcher, mpirun.rank, mpirun.local_rank),
            (Launcher::Mpirun, 1, 1)
        );
        assert_eq!(
            mpirun.rendezvous_address().unwrap(),
            ("127.0.0.1".into(), DEFAULT_MASTER_PORT)
        );

        let mpich = launch(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]).unwrap();
        assert_eq!(
            (mpich.launcher, mpich.rank, mpich.world_size),
            (Launcher::Mpirun, 2, 4)
        );

        let srun = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NUM_NODES", "2"),
            ("SLURM_NTASKS", "8"),
        ])
        .unwrap();
        assert_eq!(
            (srun.launcher, srun.rank, srun.world_size, srun.local_rank),
            (Launcher::Srun, 5, 8, 1)
        );
        // Two nodes and no MASTER_ADDR: the error says how to set it.
        let err = srun.rendezvous_address().unwrap_err().to_string();
        assert!(err.contains("export MASTER_ADDR"), "{err}");
    }

    #[test]
    fn inconsistent_variables_are_named() {
        let err = launch(&[("RANK", "0")]).unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE"), "{err}");
        let err = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 2 of 2"), "{err}");
        let err = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=\"x\""), "{err}");
        let err = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
    }
}

//! How the ranks of an NCCL job meet: rank 0 listens at
//! `MASTER_ADDR:MASTER_PORT` and hands every other rank the same bytes
//! (NCCL's unique id), as torchrun's TCP store does. Only the bootstrap goes
//! through here; the collectives themselves are NCCL's.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::DistError;

/// Identifies this protocol, so that a stray connection is refused.
const GREETING: &[u8; 16] = b"pt-host/rdzv/v1\n";

/// Rank 0 passes `payload` and gets it back; every other rank gets rank
/// 0's. Each side waits at most `timeout` for the others.
pub fn share(
    address: &(String, u16),
    rank: usize,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let (host, port) = address;
    if rank == 0 {
        serve(*port, world_size, payload, timeout)
            .with_context(|| format!("rendezvous: rank 0 serving on port {port}"))?;
        Ok(payload.to_vec())
    } else {
        fetch(host, *port, rank, world_size, timeout)
            .with_context(|| format!("rendezvous: rank {rank} reaching rank 0 at {host}:{port}"))
    }
}

fn serve(port: u16, world_size: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| {
        format!("cannot listen (is another job using MASTER_PORT {port}? choose another)")
    })?;
    listener.set_nonblocking(true)?;
    let started = Instant::now();
    let mut served = vec![false; world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                // A stray or confused peer is skipped, not fatal: the right
                // ranks may still come.
                match greet(&mut stream, world_size) {
                    Ok(rank) if !served[rank] => {
                        stream.write_all(&(payload.len() as u32).to_le_bytes())?;
                        stream.write_all(payload)?;
                        served[rank] = true;
                    }
                    Ok(rank) => eprintln!("rendezvous: rank {rank} connected twice (from {peer})"),
                    Err(error) => eprintln!("rendezvous: refused {peer}: {error:#}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if started.elapsed() > timeout {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(DistError::Timeout {
                        message: format!(
                            "ranks {} did not connect within {} s (did they start? do they see MASTER_ADDR?)",
                            missing.join(", "),
                            timeout.as_secs()
                        ),
                        seconds: timeout.as_secs(),
                    }
                    .into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads a peer's greeting: its rank, checked against `world_size`.
fn greet(stream: &mut TcpStream, world_size: usize) -> Result<usize> {
    let mut hello = [0u8; 16 + 8];
    stream.read_exact(&mut hello)?;
    if &hello[..16] != GREETING {
        bail!("not a pt-host rank");
    }
    let rank = u32::from_le_bytes(hello[16..20].try_into()?) as usize;
    let their_world = u32::from_le_bytes(hello[20..24].try_into()?) as usize;
    if their_world != world_size || rank == 0 || rank >= world_size {
        bail!(
            "it says rank {rank} of {their_world}, this job has {world_size} ranks (two jobs on one MASTER_PORT?)"
        );
    }
    Ok(rank)
}

fn fetch(
    host: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let started = Instant::now();
    // Rank 0 may not be listening yet: retry until the timeout.
    let mut stream = loop {
        let attempt = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve MASTER_ADDR {host}"))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
        match attempt {
            Some(stream) => break stream,
            None if started.elapsed() > timeout => {
                return Err(DistError::Timeout {
                    message: format!(
                        "rank 0 did not answer within {} s (did it start? is MASTER_ADDR its address?)",
                        timeout.as_secs()
                    ),
                    seconds: timeout.as_secs(),
                }
                .into());
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut hello = GREETING.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world_size as u32).to_le_bytes());
    stream.write_all(&hello)?;
    let mut length = [0u8; 4];
    stream
        .read_exact(&mut length)
        .context("rank 0 closed the connection (it refused this rank: see its log)")?;
    let mut payload = vec![0u8; u32::from_le_bytes(length) as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let address = ("127.0.0.1".to_string(), free_port());
        let secret: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        let received: Vec<Vec<u8>> = std::thread::scope(|scope| {
            // The other ranks start first and wait for rank 0.
            let handles: Vec<_> = (1..4)
                .map(|rank| {
                    let address = &address;
                    scope.spawn(move || {
                        share(address, rank, 4, &[], Duration::from_secs(20)).unwrap()
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let own = share(&address, 0, 4, &secret, Duration::from_secs(20)).unwrap();
            std::iter::once(own)
                .chain(handles.into_iter().map(|h| h.join().unwrap()))
                .collect()
        });
        assert!(received.iter().all(|r| r == &secret));
    }

    #[test]
    fn a_missing_rank_or_a_foreign_job_times_out_with_names() {
        let address = ("127.0.0.1".to_string(), free_port());
        let err = std::thread::scope(|scope| {
            // Rank 1 of a 2-rank job knocks on a 3-rank job's door.
            let foreign = scope.spawn(|| share(&address, 1, 2, &[], Duration::from_secs(2)));
            let err = share(&address, 0, 3, b"id", Duration::from_millis(600)).unwrap_err();
            assert!(foreign.join().unwrap().is_err());
            err
        });
        let message = format!("{err:#}");
        assert!(message.contains("ranks 1, 2 did not connect"), "{message}");
        let alone = share(
            &("127.0.0.1".into(), free_port()),
            1,
            2,
            &[],
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            format!("{alone:#}").contains("rank 0 did not answer"),
            "{alone:#}"
        );
    }
}

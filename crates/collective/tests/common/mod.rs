#![allow(dead_code)]
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use phalanx_collective::{BlockingGroup, GroupConfig};

pub fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

pub fn cfg(rank: usize, peers: Vec<SocketAddr>) -> GroupConfig {
    let mut c = GroupConfig::new(rank, peers);
    c.rendezvous_timeout = Duration::from_secs(10);
    c.op_timeout = Duration::from_secs(20);
    c.chunk_bytes = 4096; // force many chunks
    c
}

/// Run `f` on every rank of a fresh group of `world` ranks (one thread each).
pub fn run_world<T, F>(world: usize, chunk_bytes: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(&mut BlockingGroup) -> T + Send + Sync + Clone + 'static,
{
    let (ls, addrs) = listeners(world);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let mut c = cfg(rank, addrs);
                c.chunk_bytes = chunk_bytes;
                let mut g = BlockingGroup::connect(c, l).expect("connect");
                f(&mut g)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

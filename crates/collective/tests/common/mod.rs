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

/// A hand-written peer that speaks the rendezvous handshake over blocking plain TCP,
/// with whatever key it is given (the right secret, a wrong one, or the open key).
pub mod fake {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use phalanx_collective::auth::{self, Key, Leg, Transcript};
    use phalanx_collective::frame::{self, Hello, Tag, HEADER_BYTES};

    /// Reads one frame (header and payload), bounded by a 10 s read timeout.
    pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(frame::FrameHeader, Vec<u8>)> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hb = [0u8; HEADER_BYTES];
        s.read_exact(&mut hb)?;
        let h = frame::decode_header(&hb, 1 << 20)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut p = vec![0u8; h.payload_bytes as usize];
        s.read_exact(&mut p)?;
        Ok((h, p))
    }

    pub fn write_frame(s: &mut TcpStream, tag: Tag, payload: &[u8]) -> std::io::Result<()> {
        s.write_all(&frame::encode_frame(tag, 0, payload).unwrap())
    }

    /// The group a fake peer claims to belong to.
    #[derive(Clone, Copy)]
    pub struct Claim {
        pub key: Key,
        pub group_id: u64,
        pub world: u32,
        pub rank: u32,
    }

    /// The dialer's hello for `listener_nonce`.
    pub fn dial_hello(
        c: Claim,
        listener_rank: u32,
        listener_nonce: [u8; 32],
    ) -> (Hello, Transcript) {
        let t = Transcript {
            group_id: c.group_id,
            world: c.world,
            dialer_rank: c.rank,
            listener_rank,
            listener_nonce,
            dialer_nonce: auth::nonce(),
            binding: [0; 32],
        };
        let h = Hello {
            group_id: c.group_id,
            rank: c.rank,
            world: c.world,
            nonce: t.dialer_nonce,
            mac: auth::mac(&c.key, Leg::Dial, &t),
        };
        (h, t)
    }

    /// Reads the listener's challenge from `s`.
    pub fn read_challenge(s: &mut TcpStream) -> std::io::Result<[u8; 32]> {
        let (h, p) = read_frame(s)?;
        assert_eq!(h.tag, Tag::Challenge);
        Ok(p.try_into().expect("32-byte challenge"))
    }

    /// Dials `addr` (rank `listener_rank`) and runs the whole handshake as `c`.
    pub fn dial(addr: SocketAddr, c: Claim, listener_rank: u32) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect(addr)?;
        let nl = read_challenge(&mut s)?;
        let (hello, t) = dial_hello(c, listener_rank, nl);
        write_frame(&mut s, Tag::Hello, &hello.encode())?;
        let (h, p) = read_frame(&mut s)?;
        assert_eq!(h.tag, Tag::Hello);
        let answer = Hello::decode(&p).unwrap();
        assert!(auth::verify(&c.key, Leg::Answer, &t, &answer.mac));
        let confirm = Hello {
            mac: auth::mac(&c.key, Leg::Confirm, &t),
            ..hello
        };
        write_frame(&mut s, Tag::Confirm, &confirm.encode())?;
        Ok(s)
    }

    /// Accepts one connection on `l` from rank `dialer_rank` and answers it as `c`.
    pub fn answer(l: &TcpListener, c: Claim, dialer_rank: u32) -> std::io::Result<TcpStream> {
        let (mut s, _) = l.accept()?;
        let nl = auth::nonce();
        write_frame(&mut s, Tag::Challenge, &nl)?;
        let (h, p) = read_frame(&mut s)?;
        assert_eq!(h.tag, Tag::Hello);
        let hello = Hello::decode(&p).unwrap();
        assert_eq!(hello.rank, dialer_rank);
        let t = Transcript {
            group_id: c.group_id,
            world: c.world,
            dialer_rank,
            listener_rank: c.rank,
            listener_nonce: nl,
            dialer_nonce: hello.nonce,
            binding: [0; 32],
        };
        assert!(auth::verify(&c.key, Leg::Dial, &t, &hello.mac));
        let answer = Hello {
            group_id: c.group_id,
            rank: c.rank,
            world: c.world,
            nonce: nl,
            mac: auth::mac(&c.key, Leg::Answer, &t),
        };
        write_frame(&mut s, Tag::Hello, &answer.encode())?;
        let (h, _) = read_frame(&mut s)?;
        assert_eq!(h.tag, Tag::Confirm);
        Ok(s)
    }
}

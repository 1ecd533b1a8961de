//! The kernel's floor under a push to many proxies: the CPU it takes to
//! write a small message to each of N loopback TCP connections and to read
//! one short ack back from each, with no TLS, no HTTP/2, no gRPC and no
//! event loop. meshd's CPU per push to N proxies cannot go below this on
//! the same machine, since it makes the same syscalls and more.
//!
//! `mesh-socket-floor [--connections 1000] [--bytes 200] [--rounds 10]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn main() {
    let (mut connections, mut bytes, mut rounds) = (1000usize, 200usize, 10usize);
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value: usize = given.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("mesh-socket-floor: {flag} needs a number\nusage: mesh-socket-floor [--connections N] [--bytes N] [--rounds N]");
            std::process::exit(2)
        });
        match flag.as_str() {
            "--connections" => connections = value.max(1),
            "--bytes" => bytes = value.clamp(1, 4096),
            "--rounds" => rounds = value.max(1),
            _ => {
                eprintln!("mesh-socket-floor: unknown flag {flag}");
                std::process::exit(2)
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let addr = listener.local_addr().expect("bound address");
    let pairs: Vec<(TcpStream, TcpStream)> = (0..connections)
        .map(|_| {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            client.set_nodelay(true).expect("nodelay");
            server.set_nodelay(true).expect("nodelay");
            (server, client)
        })
        .collect();
    let (message, ack, mut buffer) = (vec![7u8; bytes], [1u8; 40], vec![0u8; 8192]);
    let mut sender_side = Vec::new();
    for _ in 0..rounds {
        let started = cpu_seconds();
        for (server, _) in &pairs {
            (&*server).write_all(&message).expect("write");
        }
        let written = cpu_seconds();
        for (_, client) in &pairs {
            (&*client).read_exact(&mut buffer[..bytes]).expect("read");
            (&*client).write_all(&ack).expect("ack");
        }
        let acked = cpu_seconds();
        for (server, _) in &pairs {
            (&*server).read_exact(&mut buffer[..ack.len()]).expect("read the ack");
        }
        sender_side.push((written - started) + (cpu_seconds() - acked));
    }
    sender_side.sort_by(|a, b| a.total_cmp(b));
    let median = sender_side[sender_side.len() / 2];
    println!(
        "{connections} loopback connections, {bytes} B out and a 40 B ack back on each: \
         sender's CPU per round (writes + ack reads, which on loopback also pays for the \
         receiving side's TCP work) median {:.2} ms, min {:.2} ms over {rounds} rounds",
        median * 1e3,
        sender_side[0] * 1e3
    );
}

//! Socket load balancing of the node's own processes (`bpf/sock.c`): the frontend a
//! socket asked for, by socket cookie and the backend it was given (`lb4_reverse_nat_sk`).

use super::{addr_be, addr_from_be};
use std::{fmt, net::Ipv4Addr};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4RevnatSkKey {
    pub cookie: u64,
    pub backend_address: u32,
    pub backend_port: u16,
    pub pad: u16,
}

impl Lb4RevnatSkKey {
    pub fn new(cookie: u64, backend: Ipv4Addr, port: u16) -> Self {
        Self {
            cookie,
            backend_address: addr_be(backend),
            backend_port: port.to_be(),
            pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Lb4RevnatSk {
    pub frontend_address: u32,
    pub frontend_port: u16,
    pub pad: u16,
}

impl Lb4RevnatSk {
    pub fn frontend(&self) -> (Ipv4Addr, u16) {
        (
            addr_from_be(self.frontend_address),
            u16::from_be(self.frontend_port),
        )
    }
}

plain_data!(Lb4RevnatSkKey, Lb4RevnatSk);

const _: () = {
    assert!(size_of::<Lb4RevnatSkKey>() == 16);
    assert!(size_of::<Lb4RevnatSk>() == 8);
};

impl fmt::Display for Lb4RevnatSkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket {} backend {}:{}",
            self.cookie,
            addr_from_be(self.backend_address),
            u16::from_be(self.backend_port)
        )
    }
}

impl fmt::Display for Lb4RevnatSk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (address, port) = self.frontend();
        write!(f, "frontend {address}:{port}")
    }
}

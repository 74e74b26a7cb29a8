//! IPv4 fragment tracking (`frag4`): a datagram's first fragment's ports for the later ones.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag4Ports {
    pub sport: u16,
    pub dport: u16,
}

plain_data!(Frag4Key, Frag4Ports);

const _: () = {
    assert!(size_of::<Frag4Key>() == 12);
    assert!(size_of::<Frag4Ports>() == 4);
};

//! The calling thread's network namespace's connected UDP sockets, listed and destroyed
//! over sock_diag (`SOCK_DIAG_BY_FAMILY`, `SOCK_DESTROY`: `ss -K` does the same). A
//! destroyed UDP socket is disconnected with `ECONNABORTED` pending, so its application
//! sees the error and connects again.
//!
//! A netlink socket serves the namespace it was created in: run these on a thread inside
//! the namespace ([`crate::NetNs::run`]).

use std::net::{IpAddr, SocketAddrV4};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::NetNsError;

/// A connected IPv4 UDP socket of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectedUdp {
    /// The socket's cookie, as `bpf_get_socket_cookie` gives it.
    pub cookie: u64,
    pub local: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// What the kernel finds the socket by again.
    id: SocketId,
}

/// Every connected IPv4 UDP socket of the calling thread's network namespace.
pub fn connected_udp4() -> Result<Vec<ConnectedUdp>, NetNsError> {
    let mut socket = diag_socket("SOCK_DIAG_BY_FAMILY")?;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        // A connected UDP socket is in TCP_ESTABLISHED.
        states: StateFlags::ESTABLISHED,
        socket_id: SocketId::new_v4(),
    });
    send(
        &mut socket,
        request,
        NLM_F_REQUEST | NLM_F_DUMP,
        "SOCK_DIAG_BY_FAMILY",
    )?;
    let mut found = Vec::new();
    receive(&mut socket, "SOCK_DIAG_BY_FAMILY", |message| {
        if let SockDiagMessage::InetResponse(response) = message {
            let id = &response.header.socket_id;
            if let (IpAddr::V4(local), IpAddr::V4(peer)) =
                (id.source_address, id.destination_address)
            {
                found.push(ConnectedUdp {
                    cookie: cookie(&id.cookie),
                    local: SocketAddrV4::new(local, id.source_port),
                    peer: SocketAddrV4::new(peer, id.destination_port),
                    id: id.clone(),
                });
            }
        }
    })?;
    Ok(found)
}

/// Destroys `socket` (found by [`connected_udp4`] on a thread of the same namespace): it
/// is disconnected and its next receive fails with `ECONNABORTED`. One already closed is
/// not an error.
pub fn destroy_udp4(socket: &ConnectedUdp) -> Result<(), NetNsError> {
    let mut diag = diag_socket("SOCK_DESTROY")?;
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: socket.id.clone(),
    }));
    send(
        &mut diag,
        request,
        NLM_F_REQUEST | NLM_F_ACK,
        "SOCK_DESTROY",
    )?;
    match receive::<SockDiagDestroy>(&mut diag, "SOCK_DESTROY", |_| {}) {
        Err(NetNsError::SockDiag { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// The kernel's cookie of a socket as sock_diag carries it: two 32-bit halves, low first,
/// each in host order.
fn cookie(halves: &[u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([halves[0], halves[1], halves[2], halves[3]]);
    let high = u32::from_ne_bytes([halves[4], halves[5], halves[6], halves[7]]);
    u64::from(high) << 32 | u64::from(low)
}

fn diag_socket(call: &'static str) -> Result<Socket, NetNsError> {
    let err = |source| NetNsError::SockDiag { call, source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    Ok(socket)
}

fn send<T>(
    socket: &mut Socket,
    message: T,
    flags: u16,
    call: &'static str,
) -> Result<(), NetNsError>
where
    T: NetlinkSerializable + Into<NetlinkPayload<T>>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, message.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .map_err(|source| NetNsError::SockDiag { call, source })?;
    Ok(())
}

/// Reads answers until the dump's end or the request's acknowledgement, handing each
/// message to `each`; an error the kernel answers is returned as its errno.
fn receive<T>(
    socket: &mut Socket,
    call: &'static str,
    mut each: impl FnMut(T),
) -> Result<(), NetNsError>
where
    T: NetlinkDeserializable,
{
    let err = |source| NetNsError::SockDiag { call, source };
    let mut buf = vec![0; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0).map_err(err)?;
        let mut offset = 0;
        while offset < size {
            let packet = NetlinkMessage::<T>::deserialize(&buf[offset..size]).map_err(|e| {
                err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            })?;
            let length = packet.header.length as usize;
            match packet.payload {
                NetlinkPayload::InnerMessage(message) => each(message),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        // An acknowledgement is an error message with code 0.
                        None => Ok(()),
                        Some(code) => Err(err(std::io::Error::from_raw_os_error(-code.get()))),
                    };
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

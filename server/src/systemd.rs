//! Readiness notifications to systemd (`Type=notify`): `READY=1` once the node serves,
//! `STOPPING=1` when it begins to shut down, `STATUS=…` for `systemctl status`.
//!
//! The protocol is one datagram on the Unix socket named by `NOTIFY_SOCKET`; a name starting
//! with `@` is in the abstract namespace. Without `NOTIFY_SOCKET` every call does nothing.

#[cfg(unix)]
use std::path::Path;

/// The notification could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// Creating the socket or sending on it.
    #[error("notifying systemd on {socket}: {source}")]
    Send {
        /// The socket's name.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Sends `state` (lines such as `READY=1`) to the socket named by `NOTIFY_SOCKET`, if set.
/// Returns whether a notification was sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy().into_owned();
    notify_to(&socket, state)?;
    Ok(true)
}

/// Sends `state` to the notification socket `socket` (a path, or `@name` for an abstract one,
/// which only Linux has). Where there are no Unix sockets there is no systemd either, and this
/// does nothing.
pub fn notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    #[cfg(unix)]
    {
        use std::os::unix::net::UnixDatagram;
        let err = |source| NotifyError::Send {
            socket: socket.to_string(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        if let Some(name) = socket.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(err)?;
                sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = (name, sock);
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "abstract socket names exist only on Linux",
                )));
            }
        } else {
            sock.send_to(state.as_bytes(), Path::new(socket))
                .map_err(err)?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = (socket, state);
        Ok(())
    }
}

/// [`notify`], logging a failure instead of returning it: a service manager that cannot be told
/// is no reason to stop serving.
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not notify systemd"),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("kappakv-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let server = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}

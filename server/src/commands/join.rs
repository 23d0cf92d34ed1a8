//! Joining the node that made an invite: dial it (its key pinned), show the invite's secret
//! and a proof of this node's key, and learn where it can be dialled. The node that made the
//! invite adds this one to its peer list as it answers; the caller adds that node to its own.

use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kappakv_protocol::sign::Keypair;
use kappakv_protocol::{Invite, NodeId, Request, Response};

use super::live::{addrs_text, connect, exchange, resolve};

/// Longest the join waits for the inviting node at one address; the addresses are tried at
/// once, and `PeerJoin` answers within the node's request timeout (10 s by default).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);

/// Why a join failed. Nothing was added on this side.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No address of the invite answered with the inviting node's key.
    #[error("cannot reach the inviting node {node} at {addrs}: {reason}")]
    Unreachable {
        /// The inviting node.
        node: NodeId,
        /// Its addresses, as the invite gives them.
        addrs: String,
        /// The last failure.
        reason: String,
    },
    /// The inviting node refused: a used, expired or unknown invite, or a bad proof.
    #[error("the inviting node refused the invite: {0}")]
    Refused(String),
    /// An invite to this node itself.
    #[error("the invite was made by this node")]
    Itself,
}

/// Joins `keypair`'s node, dialled at `own_addrs`, to the node that made `invite`, trying all
/// the invite's addresses at once. Returns that node's id and the address of the invite that
/// answered, once it has added this node to its peers. Showing the same invite again is safe:
/// the inviting node answers the node that used it the same way until the invite expires.
pub async fn join(
    keypair: &Keypair,
    own_addrs: Vec<String>,
    invite: &Invite,
) -> Result<(NodeId, String), JoinError> {
    if invite.node_id == keypair.node_id() {
        return Err(JoinError::Itself);
    }
    let request = Request::Join {
        node_id: keypair.node_id(),
        addrs: own_addrs,
        secret: invite.secret,
        proof: keypair.sign(&Invite::proof(
            &invite.node_id,
            &keypair.node_id(),
            &invite.secret,
        )),
    };
    let mut attempts: FuturesUnordered<_> = invite
        .addrs
        .iter()
        .map(|addr| {
            let request = &request;
            async move {
                let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
                    let target = resolve(addr)
                        .await?
                        .into_iter()
                        .next()
                        .ok_or_else(|| format!("{addr} resolves to no address"))?;
                    let (endpoint, conn) = connect(invite.node_id, target).await?;
                    let answer = exchange(&conn, request).await;
                    conn.close(0u32.into(), b"joined");
                    // Long enough for the close to reach the inviting node.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                    answer
                })
                .await
                .unwrap_or_else(|_| {
                    Err(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()))
                });
                (addr, answer)
            }
        })
        .collect();
    let mut last = "the invite has no address".to_string();
    while let Some((addr, answer)) = attempts.next().await {
        match answer {
            Ok(Response::Joined { node_id, .. }) if node_id == invite.node_id => {
                return Ok((node_id, addr.to_string()));
            }
            Ok(Response::Error { message, .. }) => return Err(JoinError::Refused(message)),
            Ok(other) => last = format!("{addr}: unexpected answer {other:?}"),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(JoinError::Unreachable {
        node: invite.node_id,
        addrs: addrs_text(&invite.addrs),
        reason: last,
    })
}

//! What the examples share: finding the node's ticket.

use std::error::Error;

use kappakv_client::Ticket;

/// The ticket given as the argument at `position`, else `KAPPAKV_TICKET`, else the one a node
/// started with `kappakv serve` in this folder wrote (`kappakv.data/client.ticket`).
pub fn ticket(position: usize) -> Result<Ticket, Box<dyn Error>> {
    let text = match std::env::args().nth(position) {
        Some(arg) => arg,
        None => match std::env::var("KAPPAKV_TICKET") {
            Ok(env) => env,
            Err(_) => std::fs::read_to_string("kappakv.data/client.ticket").map_err(|e| {
                format!("no ticket: pass one, set KAPPAKV_TICKET, or run next to a node's kappakv.data ({e})")
            })?,
        },
    };
    Ok(text.parse()?)
}

/// A value as text.
pub fn text(value: Option<&[u8]>) -> String {
    String::from_utf8_lossy(value.unwrap_or_default()).into_owned()
}

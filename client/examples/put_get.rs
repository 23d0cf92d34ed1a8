//! Connect to a node, write a key and read it back.
//!
//! ```sh
//! kappakv serve &                                   # in this folder, or pass a ticket:
//! cargo run -p kappakv-client --example put_get -- [TICKET]
//! ```

mod common;

use kappakv_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect(&common::ticket(1)?).await?;

    let written = client.put("greeting", "hello").await?;
    println!(
        "wrote greeting at LSN {} as version {}",
        written.lsn, written.id
    );

    // Every current value (there may be several: see the siblings example) and the context.
    let got = client.get("greeting").await?;
    for version in &got.values {
        println!("greeting = {}", common::text(version.value.as_deref()));
    }
    println!("context {}", got.context);
    Ok(())
}
